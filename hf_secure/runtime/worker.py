"""A party process started by :class:`~hf_secure.runtime.launch.PartyGroup`.

Run as ``python -m hf_secure.runtime.worker ROLE`` (ROLE only names the process in ``ps``). It
reads one JSON line from standard input: the launcher's loopback address and its process key
(which authenticates the connections, and under which torch passes tensors as shared memory). It connects, receives the launcher's import path and its job
(role, rendezvous, program and arguments, pickled), and runs
:func:`~hf_secure.runtime.launch.party_main`, the code path of ``hf-secure party``. Nothing of the
user's ``__main__`` is imported. An argument equal to ``PIPE`` becomes a second connection to the
launcher.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from multiprocessing.connection import Client


def main() -> None:
    ticket = json.loads(sys.stdin.readline())
    address, authkey, role = (ticket["host"], ticket["port"]), bytes.fromhex(ticket["authkey"]), ticket["role"]
    multiprocessing.current_process().authkey = authkey  # tensors' shared memory is passed under this key
    control = Client(address, authkey=authkey)
    control.send((role, "control"))
    sys.path[:0] = [p for p in control.recv() if p not in sys.path]

    from .launch import PIPE, party_main  # imports torch: after the path is set, as the launcher's

    try:
        job = control.recv()
    except Exception as exc:  # noqa: BLE001  (unpicklable job: say why, then stop)
        control.send(("error", f"{type(exc).__name__}: the party's job cannot be loaded in a fresh process "
                               f"({exc}); programs must be importable by name, not defined in __main__"))
        raise SystemExit(1) from None
    role, world_size, rendezvous, timeout_s, program, args, threads, identity = job
    if PIPE in args:
        pipe = Client(address, authkey=authkey)
        pipe.send((role, "pipe"))
        args = tuple(pipe if a == PIPE else a for a in args)
    party_main(role, world_size, rendezvous, timeout_s, program, args, control, threads, identity)


if __name__ == "__main__":
    main()
