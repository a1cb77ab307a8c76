"""Start the parties of a multi-party protocol and collect their results.

Roles are fixed ranks in one torch.distributed process group (gloo on CPU): the two computing
servers, the dealer (correlated randomness, independent of inputs and weights), the client (shares
the input, reconstructs the output) and the model owner (shares the weights).

``run_parties`` starts one process per role on this machine (rendezvous on loopback; each a
process of this package, :mod:`hf_secure.runtime.worker`) and returns
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
import json
import os
import queue
import multiprocessing
import socket
import subprocess
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from multiprocessing.connection import AuthenticationError, Connection, Listener

import torch
import torch.distributed as dist

from ..errors import PartyFailedError, UnknownOptionError
from .channel import PEER_FAILED, Channel
from .secure_link import PartyIdentity, handshake, identity_from_env


class Role(enum.IntEnum):
    SERVER0 = 0
    SERVER1 = 1
    DEALER = 2
    CLIENT = 3
    OWNER = 4


PIPE = "hf_secure.runtime.PIPE"  # in a role's arguments: becomes a connection to the launcher (PartyGroup.pipe)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_id(rendezvous: str) -> int:
    """The session number in every message header: the same for all parties of one rendezvous."""
    return zlib.crc32(rendezvous.encode())


def join(role: Role, rendezvous: str, timeout_s: float, identity: PartyIdentity, world_size: int = len(Role),
         threads: int = 1) -> Channel:
    """Join the process group of ``rendezvous`` as ``role``; the party's checked channel.

    Every pair of parties first proves to each other that it is the role the session's roster
    names and agrees on traffic keys (:func:`.secure_link.handshake`); a party that is not is
    refused. Traffic is then sealed (AES-GCM) unless the rendezvous is on loopback: there, every
    party is on this machine, and whoever can read loopback traffic can read the parties' memory too.
    """
    # loopback only if gloo's own connections stay on it too (GLOO_SOCKET_IFNAME may name another interface)
    loopback = (rendezvous.startswith(("tcp://127.", "tcp://localhost:"))
                and os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo") == "lo")
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=rendezvous, rank=int(role), world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    session = session_id(rendezvous)
    links = handshake(identity, world_size, session)
    return Channel(int(role), session, links=None if loopback else links)


def party_main(role: Role, world_size: int, rendezvous: str, timeout_s: float, program: Callable, args: tuple,
               control: Connection, threads: int, identity: PartyIdentity) -> None:
    """One party started by :class:`PartyGroup`: join, run ``program(role, channel, *args)``, report.

    The result (or the error) goes back over ``control``. A party that finishes early then waits
    (blocking, idle) until the launcher says every party is done before it tears down the process
    group: gloo's teardown busy-waits, which would steal a core from the parties still computing.
    """
    try:
        channel = join(Role(role), rendezvous, timeout_s, identity, world_size, threads)
        result = program(Role(role), channel, *args)
        control.send(("ok", result))
        control.poll(timeout_s)
    except BaseException as exc:  # reported to the launcher, which raises it
        control.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-10)}"))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class PartyGroup:
    """One process per local role, started together; results and failures come back to the launcher.

    Each party is its own process of this package (``python -m hf_secure.runtime.worker``, the
    code path of ``hf-secure party``): the user's script, notebook or ``python -c`` is never
    re-imported, whether or not it has an ``if __name__ == "__main__":`` guard. A party connects
    back to the launcher over loopback with the launcher's process key (random, 256 bits: multiprocessing's
    authenticated connections, HMAC challenge) given on its standard input, receives its job, and reports its
    result over the same connection. ``PIPE`` in a role's arguments becomes a second connection,
    whose launcher end is :meth:`pipe`.

    Without ``rendezvous`` every rank ``0..n-1`` must be local (a loopback group of those roles);
    with it, the group has ``world_size`` ranks and the missing roles join from elsewhere.
    """

    def __init__(self, program: Callable, args_by_role: dict[Role, tuple], timeout_s: float = 60.0,
                 threads: int = 1, rendezvous: str | None = None, world_size: int | None = None,
                 party_key: str | None = None):
        roles = list(args_by_role)
        if rendezvous is None and sorted(int(r) for r in roles) != list(range(len(roles))):
            raise UnknownOptionError("roles must be a prefix of Role (ranks 0..n-1)")
        self.timeout_s = timeout_s
        self.results: queue.Queue = queue.Queue()
        self.collected: dict[Role, object] = {}
        world_size = world_size or len(roles)
        # parties all started here get fresh identities; with parties elsewhere, the local role (one)
        # has its key file from the operator (party_key or HF_SECURE_PARTY_KEY)
        if rendezvous is None:
            identities = dict(zip(roles, PartyIdentity.generate_all(world_size)))
        elif len(roles) == 1:
            identities = {roles[0]: identity_from_env(int(roles[0]), world_size, party_key)}
        else:
            raise UnknownOptionError("with parties elsewhere, one local role (its own key file) is supported")
        rendezvous = rendezvous or f"tcp://127.0.0.1:{_free_port()}"
        self._jobs = {role: (int(role), world_size, rendezvous, timeout_s, program, args_by_role[role], threads,
                             identities[role]) for role in roles}
        self._controls: dict[Role, Connection] = {}
        self._pipes: dict[Role, Connection] = {}
        self._arrived = threading.Condition()
        self._stopping = False
        # The process's own key, as multiprocessing's spawn hands it down: torch sends tensors between
        # processes as shared memory, whose file descriptors travel over connections checked with it.
        authkey = multiprocessing.current_process().authkey
        self._listener = Listener(("127.0.0.1", 0), authkey=authkey)
        threading.Thread(target=self._accept, daemon=True).start()
        host, port = self._listener.address
        ticket = {"host": host, "port": port, "authkey": authkey.hex()}
        self.procs = {}
        for role in roles:
            proc = subprocess.Popen([sys.executable, "-m", "hf_secure.runtime.worker", Role(role).name.lower()],
                                    stdin=subprocess.PIPE, text=True)
            self.procs[role] = proc
            try:
                proc.stdin.write(json.dumps({**ticket, "role": int(role)}) + "\n")
                proc.stdin.close()
            except OSError:
                pass  # it died at start: check() reports it as a party that exited without a result

    # -- connections from the parties ------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                conn = self._listener.accept()
                role, kind = conn.recv()
                role = Role(role)
            except (OSError, EOFError, ValueError, AuthenticationError):
                if self._stopping:
                    return
                continue  # not one of our parties (wrong key, garbage): ignore it
            if kind == "control":
                conn.send(list(sys.path))  # the launcher's import path, for the program's own modules
                conn.send(self._jobs[role])
                threading.Thread(target=self._read, args=(role, conn), daemon=True).start()
            with self._arrived:
                (self._controls if kind == "control" else self._pipes)[role] = conn
                self._arrived.notify_all()

    def _read(self, role: Role, conn: Connection) -> None:
        try:
            status, payload = conn.recv()
        except (EOFError, OSError):
            return  # died without a result: check() notices the exited process
        self.results.put((int(role), status, payload))

    def pipe(self, role: Role) -> Connection:
        """The launcher's end of ``role``'s ``PIPE`` argument, once the party has connected."""
        deadline = time.monotonic() + self.timeout_s + 30  # start-up (imports) comes on top
        with self._arrived:
            while role not in self._pipes:
                self.check()
                if time.monotonic() > deadline:
                    raise PartyFailedError(f"party {role.name} did not connect within {self.timeout_s} s")
                self._arrived.wait(0.2)
            return self._pipes[role]

    # -- results ----------------------------------------------------------------------------
    def check(self, wait_s: float = 0.0) -> None:
        """Collect finished parties' results (waiting up to ``wait_s``); raise on a failed or dead party."""
        try:
            rank, status, payload = self.results.get(timeout=wait_s) if wait_s else self.results.get_nowait()
        except queue.Empty:
            dead = [r.name for r, p in self.procs.items() if p.poll() is not None and r not in self.collected]
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
        """Tell every party to finish, then end whatever still runs; the listener closes."""
        with self._arrived:
            controls = list(self._controls.values())
        for conn in controls:
            try:
                conn.send(("done",))
            except OSError:
                pass  # that party is gone already
        for proc in self.procs.values():
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._stopping = True
        self._listener.close()
        for conn in [*controls, *self._pipes.values()]:
            conn.close()


def run_parties(program: Callable, args_by_role: dict[Role, tuple], timeout_s: float = 60.0,
                threads: int = 1) -> dict[Role, object]:
    """Run ``program(role, channel, *args_by_role[role])`` in one process per role; return ``{role: result}``.

    The roles must be the ranks 0..n-1 (a prefix of :class:`Role`); each process receives only its
    own arguments. Programs and arguments travel pickled, so they must be importable by name
    (defined in a module, not in the user's ``__main__``); results travel back the same way.
    """
    group = PartyGroup(program, args_by_role, timeout_s, threads)
    try:
        return group.wait()
    finally:
        group.stop()
