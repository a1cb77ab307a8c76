"""Start the parties of a multi-party protocol and collect their results.

Roles are fixed ranks in one torch.distributed process group (gloo on CPU): the two computing
servers, the dealer (correlated randomness, independent of inputs and weights), the client (shares
the input, reconstructs the output) and the model owner (shares the weights).

``run_parties`` starts one process per role on this machine (rendezvous on loopback) and returns
each party's result. Parties may also live on other machines: :func:`join` is what every party
runs, whether :class:`PartyGroup` started it here or ``hf-secure party --role ... --rendezvous
tcp://HOST:PORT`` started it there (HOST:PORT is where server 0, rank 0, hosts the rendezvous). If a party raises or dies, the others fail at their next message to it
(gloo notices the closed connection at once) or at the group timeout; the launcher then stops
whatever still runs and raises :class:`PartyFailedError` with the first error. Nothing hangs past
``timeout_s``.
"""

from __future__ import annotations

import datetime
import enum
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
import zlib
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..errors import PartyFailedError
from .channel import PEER_FAILED, Channel


class Role(enum.IntEnum):
    SERVER0 = 0
    SERVER1 = 1
    DEALER = 2
    CLIENT = 3
    OWNER = 4


CONTEXT = mp.get_context("spawn")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_id(rendezvous: str) -> int:
    """The session number in every message header: the same for all parties of one rendezvous."""
    return zlib.crc32(rendezvous.encode())


def join(role: Role, rendezvous: str, timeout_s: float, world_size: int = len(Role), threads: int = 1) -> Channel:
    """Join the process group of ``rendezvous`` as ``role``; the party's checked channel."""
    if rendezvous.startswith(("tcp://127.", "tcp://localhost:")):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=rendezvous, rank=int(role), world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return Channel(int(role), session_id(rendezvous))


def party_main(role: Role, world_size: int, rendezvous: str, timeout_s: float, program: Callable, args: tuple,
               results, done, threads: int) -> None:
    """One party started by :class:`PartyGroup`: join, run ``program(role, channel, *args)``, report.

    A party that finishes early waits (blocking, idle) until every party is done before it tears
    down the process group: gloo's teardown busy-waits, which would steal a core from the parties
    still computing.
    """
    try:
        channel = join(Role(role), rendezvous, timeout_s, world_size, threads)
        result = program(Role(role), channel, *args)
        results.put((int(role), "ok", result))
        done.wait(timeout_s)
    except BaseException as exc:  # reported to the launcher, which raises it
        results.put((int(role), "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-10)}"))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class PartyGroup:
    """One process per local role, started together; results and failures come back through a queue.

    Without ``rendezvous`` every rank ``0..n-1`` must be local (a loopback group of those roles);
    with it, the group has ``world_size`` ranks and the missing roles join from elsewhere.
    """

    def __init__(self, program: Callable, args_by_role: dict[Role, tuple], timeout_s: float = 60.0,
                 threads: int = 1, rendezvous: str | None = None, world_size: int | None = None):
        roles = list(args_by_role)
        if rendezvous is None and sorted(int(r) for r in roles) != list(range(len(roles))):
            raise ValueError("roles must be a prefix of Role (ranks 0..n-1)")
        self.timeout_s = timeout_s
        self.results = CONTEXT.Queue()
        self._done = CONTEXT.Event()
        rendezvous = rendezvous or f"tcp://127.0.0.1:{_free_port()}"
        world_size = world_size or len(roles)
        self.procs = {
            role: CONTEXT.Process(target=party_main, daemon=True,
                                  args=(role, world_size, rendezvous, timeout_s, program,
                                        args_by_role[role], self.results, self._done, threads))
            for role in roles
        }
        for proc in self.procs.values():
            proc.start()
        self.collected: dict[Role, object] = {}

    def check(self, wait_s: float = 0.0) -> None:
        """Collect finished parties' results (waiting up to ``wait_s``); raise on a failed or dead party."""
        try:
            rank, status, payload = self.results.get(timeout=wait_s) if wait_s else self.results.get_nowait()
        except queue.Empty:
            dead = [r.name for r, p in self.procs.items() if not p.is_alive() and r not in self.collected]
            if dead:
                time.sleep(0.5)  # a dying party's own report may still be in flight
                if self.results.empty():
                    raise PartyFailedError(f"parties {dead} exited without a result") from None
            return
        if status == "error":
            raise PartyFailedError(f"party {Role(rank).name} failed: {payload}")
        self.collected[Role(rank)] = payload

    def root_cause(self, wait_s: float = 2.0) -> str | None:
        """After a failure: the first reported error that is not a party noticing a failed peer."""
        errors, deadline = [], time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                rank, status, payload = self.results.get(timeout=0.1)
            except queue.Empty:
                continue
            if status == "error":
                errors.append(f"party {Role(rank).name} failed: {payload}")
        causes = [e for e in errors if PEER_FAILED not in e]
        return (causes or errors or [None])[0]

    def wait(self) -> dict[Role, object]:
        """Every party's result; raises as soon as one fails, or past the timeout."""
        deadline = time.monotonic() + self.timeout_s + 30  # start-up (imports) comes on top
        while len(self.collected) < len(self.procs):
            if time.monotonic() > deadline:
                raise PartyFailedError(f"parties did not finish within {self.timeout_s} s")
            self.check(wait_s=1.0)
        return self.collected

    def stop(self) -> None:
        self._done.set()
        for proc in self.procs.values():
            proc.join(timeout=2)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)


def run_parties(program: Callable, args_by_role: dict[Role, tuple], timeout_s: float = 60.0,
                threads: int = 1) -> dict[Role, object]:
    """Run ``program(role, channel, *args_by_role[role])`` in one process per role; return ``{role: result}``.

    The roles must be the ranks 0..n-1 (a prefix of :class:`Role`); each process receives only its
    own arguments. Results travel back through a multiprocessing queue, so they must be picklable.
    """
    group = PartyGroup(program, args_by_role, timeout_s, threads)
    try:
        return group.wait()
    finally:
        group.stop()
