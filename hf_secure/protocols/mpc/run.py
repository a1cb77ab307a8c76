"""Run two-party programs across real processes: client, model owner, two servers, dealer.

An :class:`MPCSession` starts one process per role (:class:`hf_secure.runtime.PartyGroup`), or
only the client's when the other roles run elsewhere (``hf-secure party``, the same
:func:`session_party`); each process receives only what its role may know: the owner the weights,
the client the user's queries, everybody the program (public: architecture and approximations).
Setup happens once: the owner sends the servers and the dealer the manifest (weight names and
shapes), the dealer sends each server its seed, the owner shares the weights, the servers re-lay them out locally (``program.derive``) and open
the masked matrices (one round). Then every query:

1. the client sends the servers and the dealer the public part of the query (input shapes,
   masks, positions) and the servers its input shares;
2. offline: the dealer replays ``program.forward`` on shapes only and sends server 1 its
   corrections; each server replays it on shapes too, keeping its input-independent material
   (mask shares, ``A @ F`` of linear layers: :meth:`.core.MPC.prepare`);
3. online: both servers run ``program.forward`` on their shares and send the client their output
   shares, which the client reconstructs;
4. the servers and the dealer send the client their reports of the query (traffic per scope,
   seconds, the dealer's offline material, the process's peak memory).

The user's process talks to the client process through a pipe; a party that fails or dies ends
the query with :class:`~hf_secure.errors.PartyFailedError` within the session timeout.

What a program must provide is :class:`Program`; :class:`.gpt2.GPT2Program` is the worked example
to start from.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ...errors import PartyFailedError, ProgramError, UnknownOptionError
from ...progress import progress
from ...runtime import PIPE, Channel, PartyGroup, Role
from .core import DEALER, MPC, SERVER0, SERVER1, Shared
from .layers import SharedWeight, prepare_weights
from .ranges import refusal, verify_ranges
from .ring import DEFAULT_FRAC_BITS, decode, encode, share

_SERVERS = (SERVER0, SERVER1)
_CLIENT, _OWNER = int(Role.CLIENT), int(Role.OWNER)
_STOP, _FORWARD = 0, 1
SETUP_STEPS = (Role.OWNER, Role.DEALER, Role.SERVER0, Role.SERVER1)  # in the order they get ready
_REFUSED = -1  # in place of the output count: the query left a range (.ranges)


@runtime_checkable
class Program(Protocol):
    """The contract of a two-party program: what every party runs, from the weights' shares to the
    outputs' shares. Public (the architecture and its approximations), picklable (it is sent to
    each party's process), and data-oblivious: which operations run, on which shapes, depends only
    on the weights' shapes and the query's public fields, never on a secret value -- the dealer and
    each server's offline replay run it on shapes only (:meth:`.core.MPC.prepare`), and any
    divergence fails the session with :class:`~hf_secure.errors.ProgramMismatchError`.

    Start from :class:`.gpt2.GPT2Program` (on :class:`.decoder.DecoderProgram`); an encoder:
    :class:`.bert.BertProgram`.
    """

    def derive(self, weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
        """Re-lay out the weight shares locally (transposes, concatenations: linear maps only, each
        party on its own share, no communication): ``(program weights by name, names of those used
        as right operands of products)`` -- the latter get a fixed mask opened once at setup
        (:func:`.layers.prepare_weights`). Input: the owner's weights by state-dict key (int64
        fixed-point shares; meta tensors on the dealer)."""
        ...

    def forward(self, mpc: MPC, weights: dict, inputs: list[Shared], public: dict[str, torch.Tensor],
                state: dict) -> list[Shared]:
        """One query: the private ``inputs`` (shares; placeholders offline) and the ``public`` fields
        (int64 tensors every party sees, the dealer included) to the outputs' shares, which only the
        client reconstructs. ``state`` is the party's own and lives as long as the session (a
        decoder keeps its KV cache shares there; the dealer, replaying on shapes, the matching
        masks). Raises :class:`~hf_secure.errors.InvalidInputError` for public fields that do not
        fit; values outside an approximation's range are recorded, not raised (:mod:`.ranges`)."""
        ...


def _encode(x: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """Floats become fixed point; integer tensors (one-hot rows) stay integers."""
    return encode(x, frac_bits) if x.is_floating_point() else x.long()


def _meta(shape) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=torch.int64, device="meta")


def _send_public(channel: Channel, public: dict[str, torch.Tensor], to: int) -> None:
    for name, value in public.items():
        channel.send(torch.frombuffer(bytearray(name.encode()), dtype=torch.uint8), to)
        channel.send(value.long(), to)


def _recv_public(channel: Channel, count: int) -> dict[str, torch.Tensor]:
    public = {}
    for _ in range(count):
        name = bytes(channel.recv(_CLIENT, dtype=torch.uint8).tolist()).decode()
        public[name] = channel.recv(_CLIENT, dtype=torch.int64)
    return public


def session_party(role: Role, channel: Channel, program: Program, private, frac_bits: int = DEFAULT_FRAC_BITS,
                  record_views: bool = False):
    """The life of one party in a session (see the module docstring); the same wherever it runs.

    ``private`` is what only this role holds: the owner's weights (by state-dict key), the
    client's pipe to the user's process; None for the servers and the dealer. With
    ``record_views`` (``hf-secure audit``, every party on one machine) each server also sends the
    client, after its report, what it saw online: its input shares, every value it opened and its
    share of each layer's output (:meth:`.core.MPC.see`).
    """
    if role == Role.OWNER:
        with channel.scope("setup"):
            manifest = {name: list(t.shape) for name, t in private.items()}
            for party in (*_SERVERS, DEALER):
                channel.send_json(manifest, party)
            for name in manifest:
                w0, w1 = share(_encode(private[name], frac_bits))
                channel.send(w0, SERVER0)
                channel.send(w1, SERVER1)
            channel.send_json({"ready": role.name}, _CLIENT)
        return {"stats": channel.summary()}
    if role == Role.CLIENT:
        return _client_loop(channel, private, frac_bits, record_views)

    with channel.scope("setup"):
        weight_shapes = channel.recv_json(_OWNER)
        if role == Role.DEALER:
            seeds = tuple(os.urandom(16) for _ in _SERVERS)
            for server, seed in zip(_SERVERS, seeds):
                channel.send(torch.frombuffer(bytearray(seed), dtype=torch.int64), server)
            mpc = MPC(DEALER, channel, seeds, frac_bits)
            raw = {name: _meta(shape) for name, shape in weight_shapes.items()}
        else:
            seed = channel.recv(DEALER, shape=(2,), dtype=torch.int64).numpy().tobytes()
            mpc = MPC(int(role), channel, seed, frac_bits)
            raw = {name: channel.recv(_OWNER, shape=shape, dtype=torch.int64) for name, shape in weight_shapes.items()}
        derived, matrices = program.derive(raw)
        weights = prepare_weights(mpc, derived, matrices)
        replay_weights = _shapes_only(weights)  # what a server's offline replay runs on
        channel.send_json({"ready": role.name}, _CLIENT)
    state = {}  # what a program keeps between queries (a decoder's KV cache shares)
    while True:
        op, n_inputs, n_public = channel.recv(_CLIENT, shape=(3,), dtype=torch.int64).tolist()
        if op == _STOP:
            return {"stats": channel.summary()}
        channel.stats.clear()
        mpc.view = [] if record_views and role != Role.DEALER else None
        public = _recv_public(channel, n_public)
        start = time.perf_counter()
        if role == Role.DEALER:
            shapes = [tuple(channel.recv(_CLIENT, dtype=torch.int64).tolist()) for _ in range(n_inputs)]
            with channel.scope("offline"):
                program.forward(mpc, weights, [mpc.placeholder(s) for s in shapes], public, state)
                verify_ranges(mpc)
                nbytes = mpc.send_offline()
            report = {"offline_bytes": nbytes, "offline_seconds": time.perf_counter() - start}
        else:
            inputs = [mpc.shared(mpc.see("input share", channel.recv(_CLIENT, dtype=torch.int64)))
                      for _ in range(n_inputs)]
            with channel.scope("offline"):
                placeholders = [mpc.placeholder(x.shape) for x in inputs]
                mpc.prepare(lambda: (program.forward(mpc, replay_weights, placeholders, public, _shapes_only(state)),
                                     verify_ranges(mpc)))
                if role == SERVER1:
                    mpc.receive_offline()
                # both servers hold their offline material before the online clock starts
                channel.exchange(torch.zeros(1, dtype=torch.int64), mpc.peer)
            start = time.perf_counter()
            with channel.scope("online"):
                outputs = program.forward(mpc, weights, inputs, public, state)
                with channel.scope("ranges"):
                    out_of_range = verify_ranges(mpc)
                mpc.finish()
                answer_client(channel, role, out_of_range, [out.share for out in outputs])
            report = {"online_seconds": time.perf_counter() - start}
        report["stats"] = channel.summary()
        report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        with channel.scope("report"):
            channel.send_json(report, _CLIENT)
            if mpc.view is not None:
                channel.send_json([[where, kind] for where, kind, _ in mpc.view], _CLIENT)
                for _, _, value in mpc.view:
                    channel.send(value, _CLIENT)


def answer_client(channel: Channel, role: Role, out_of_range: dict, shares: list[torch.Tensor]) -> None:
    """A server's answer to a query: its output shares, or (server 0, for a query refused by the
    range checks) what left its range instead of any output."""
    if role == SERVER0:
        channel.send(torch.tensor([_REFUSED if out_of_range else len(shares)]), _CLIENT)
        if out_of_range:
            channel.send_json(out_of_range, _CLIENT)
    if not out_of_range:
        for tensor in shares:
            channel.send(tensor, _CLIENT)


def _shapes_only(obj):
    """What a server's offline replay runs on: ``obj`` (weights, state) with shares as meta tensors.

    Model weights keep their opened difference ``F`` (public to the servers), from which the
    replay prepares ``A @ F``.
    """
    if isinstance(obj, torch.Tensor):
        return _meta(obj.shape)
    if isinstance(obj, Shared):
        return obj.mpc.placeholder(obj.shape)
    if isinstance(obj, SharedWeight):
        opened = obj.opened if obj.static else _meta(obj.opened.shape)
        return SharedWeight(obj.name, _meta(obj.share.shape), _meta(obj.mask.shape), opened, obj.static)
    if isinstance(obj, dict):
        return {k: _shapes_only(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_shapes_only(v) for v in obj)
    return obj


def _client_loop(channel: Channel, conn, frac_bits: int, record_views: bool, ring_bits: int = 64) -> dict:
    """The client process: relays the user's queries, shares inputs, reconstructs outputs
    (on ``Z_2^ring_bits``: the fss protocol's outputs are shares on a smaller ring).

    First it relays the setup's progress: each party says when it is ready (:data:`SETUP_STEPS`).
    With ``record_views`` each server's report gains its ``view``: [(scope, kind, tensor)].
    """
    parties = (SERVER0, SERVER1, DEALER)
    with channel.scope("setup"):
        for party in SETUP_STEPS:
            conn.send(("progress", channel.recv_json(int(party))["ready"]))
    while True:
        request = conn.recv()
        if request[0] == "stop":
            for party in parties:
                channel.send(torch.tensor([_STOP, 0, 0]), party)
            conn.send(("stopped", None))
            return {"stats": channel.summary()}
        _, inputs, public = request
        try:
            for party in parties:
                channel.send(torch.tensor([_FORWARD, len(inputs), len(public)]), party)
                _send_public(channel, public, party)
            for x in inputs:
                channel.send(torch.tensor(x.shape, dtype=torch.int64), DEALER)
            for x in inputs:
                x0, x1 = share(_encode(x, frac_bits))
                channel.send(x0, SERVER0)
                channel.send(x1, SERVER1)
            count = int(channel.recv(SERVER0, shape=(1,)).item())
            refused = channel.recv_json(SERVER0) if count == _REFUSED else None
            outputs = [] if refused else [decode(_signed(channel.recv(SERVER0) + channel.recv(SERVER1), ring_bits),
                                                 frac_bits) for _ in range(count)]
            reports = {Role(party).name: channel.recv_json(party) for party in parties}
            if record_views:
                for party in _SERVERS:
                    names = channel.recv_json(party)
                    reports[Role(party).name]["view"] = [(where, kind, channel.recv(party)) for where, kind in names]
        except PartyFailedError as exc:
            conn.send(("error", str(exc)))
            raise
        conn.send(("refused", (refused, reports)) if refused else ("ok", (outputs, reports)))


def _signed(v: torch.Tensor, bits: int) -> torch.Tensor:
    if bits >= 64:
        return v
    v = v & ((1 << bits) - 1)
    return torch.where(v >= (1 << (bits - 1)), v - (1 << bits), v)


class MPCSession:
    """Long-lived parties running one program: weights shared once, then any number of queries.

    By default every role runs here, one process each. With ``rendezvous="tcp://HOST:PORT"`` only
    the client runs here (and the owner too if ``weights`` are given); the other roles join with
    ``hf-secure party --role ROLE --model DIR --rendezvous tcp://HOST:PORT`` on their machines, and
    the client authenticates with its key file (``party_key`` or ``HF_SECURE_PARTY_KEY``).
    """

    party_function = staticmethod(session_party)  # what each party's process runs (the fss session has its own)
    description = "mpc session setup"
    party_private = None  # what the servers and the dealer get as ``private`` (fss: their options)

    def __init__(self, program: Program, weights: dict[str, torch.Tensor] | None, frac_bits: int = DEFAULT_FRAC_BITS,
                 timeout_s: float = 300.0, threads: int = 1, rendezvous: str | None = None,
                 party_key: str | None = None, record_views: bool = False):
        if not isinstance(program, Program):
            raise ProgramError(f"{type(program).__name__} is not an mpc program: it needs derive() and forward()")
        if record_views and rendezvous is not None:
            raise UnknownOptionError("record_views needs every party in this process's session (no rendezvous)")
        self.timeout_s = timeout_s
        private = {Role.CLIENT: PIPE, Role.OWNER: weights,
                   **{role: self.party_private for role in (Role.SERVER0, Role.SERVER1, Role.DEALER)}}
        if rendezvous is None:
            roles = list(Role)
        else:
            roles = [Role.CLIENT] + ([Role.OWNER] if weights is not None else [])
        args = {role: (program, private.get(role), frac_bits, record_views) for role in roles}
        self._group = PartyGroup(self.party_function, args, timeout_s=timeout_s, threads=threads,
                                 rendezvous=rendezvous, world_size=len(Role), party_key=party_key)
        self.closed = False
        with progress(1 + len(SETUP_STEPS), self.description, unit="party") as bar:
            try:
                self._conn = self._group.pipe(Role.CLIENT)
                bar.set_postfix_str("parties started")
                bar.update()
                for _ in SETUP_STEPS:  # the owner shares the weights, the servers lay them out
                    status, payload = self._await_answer()
                    if status != "progress":
                        raise PartyFailedError(self._group.root_cause() or payload)
                    bar.set_postfix_str(f"{payload.lower()} ready")
                    bar.update()
            except PartyFailedError:
                self.close()
                raise

    def run(self, inputs: list[torch.Tensor], public: dict[str, torch.Tensor] | None = None):
        """One query: returns (decoded outputs, {role name: report of this query})."""
        if self.closed:
            raise PartyFailedError("this session is closed (a party failed or it was closed)")
        self._conn.send(("forward", inputs, public or {}))
        status, payload = self._await_answer()
        if status == "refused":
            out_of_range, _ = payload
            raise refusal(out_of_range)
        if status != "ok":
            cause = self._group.root_cause()
            self.close()
            raise PartyFailedError(cause or payload)
        return payload

    def _await_answer(self):
        deadline = time.monotonic() + self.timeout_s + 30  # the first query also waits for start-up
        while not self._conn.poll(0.2):
            try:
                self._group.check()
            except PartyFailedError:
                self.close()
                raise
            if time.monotonic() > deadline:
                self.close()
                raise PartyFailedError(f"no answer from the parties within {self.timeout_s} s")
        return self._conn.recv()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if getattr(self, "_conn", None) is not None and self._group.procs[Role.CLIENT].poll() is None:
                self._conn.send(("stop",))
                if self._conn.poll(10):
                    self._conn.recv()
        except (EOFError, OSError):
            pass  # the client process failed while stopping (a peer is gone): stop what is left
        finally:
            self._group.stop()

    def __enter__(self) -> "MPCSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def online_traffic(report: dict) -> dict:
    """A server's traffic in one query, summed over its scopes (layers), offline phase excluded."""
    scopes = [s for name, s in report["stats"].items() if name not in ("setup", "offline", "report")]
    return {k: sum(s[k] for s in scopes) for k in ("bytes_sent", "bytes_received", "messages", "rounds")}


def run_program(program, inputs: list[torch.Tensor], weights: dict[str, torch.Tensor] | None = None,
                public: dict | None = None, frac_bits: int = DEFAULT_FRAC_BITS, timeout_s: float = 120.0,
                threads: int = 1) -> tuple[list[torch.Tensor], dict]:
    """One query in a fresh session: (decoded outputs, per-role reports)."""
    with MPCSession(program, weights or {}, frac_bits, timeout_s, threads) as session:
        return session.run(inputs, public)


@dataclass(frozen=True)
class FunctionProgram:
    """A weightless program from a module-level function ``fn(mpc, *inputs) -> list[Shared]``."""

    fn: object

    def derive(self, weights):
        return weights, set()

    def forward(self, mpc, weights, inputs, public, state):
        return self.fn(mpc, *inputs)


def secure_eval(fn, inputs: list[torch.Tensor], **kwargs):
    """``run_program`` for a weightless function."""
    return run_program(FunctionProgram(fn), inputs, **kwargs)
