"""Run a two-party computation end to end on this machine: client, model owner, two servers, dealer.

``run_program(program, inputs=..., weights=..., public=...)`` starts one process per role
(:func:`hf_secure.runtime.run_parties`); each process receives only what its role may know: the
client its inputs, the owner its weights, everybody the public manifest (shapes, architecture,
masks and positions). Then:

1. setup: the dealer sends each server its seed; the owner shares the weights; the servers
   re-lay them out locally (``program.derive``) and open the masked matrices (one round);
   the client shares its inputs;
2. offline: the dealer replays ``program.forward`` on shapes only and sends server 1 its
   corrections;
3. online: both servers run ``program.forward`` on their shares and send the client their output
   shares, which the client reconstructs.

A program is a picklable object with ``derive(weights) -> (weights, matrices)`` (local re-layout
of weight shares: transposes, concatenations) and ``forward(mpc, weights, inputs, public) ->
list[Shared]``; it must be data-oblivious.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from ...runtime import Channel, Role, run_parties
from .core import DEALER, MPC, SERVER0, SERVER1
from .layers import prepare_weights
from .ring import DEFAULT_FRAC_BITS, decode, encode, share

_SERVERS = (SERVER0, SERVER1)


def _encode(x: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """Floats become fixed point; integer tensors (one-hot rows) stay integers."""
    return encode(x, frac_bits) if x.is_floating_point() else x.long()


def _send_shares(channel: Channel, tensors, frac_bits: int) -> None:
    for x in tensors:
        x0, x1 = share(_encode(x, frac_bits))
        channel.send(x0, SERVER0)
        channel.send(x1, SERVER1)


def _party(role: Role, channel: Channel, program, private, manifest: dict, frac_bits: int) -> dict:
    weight_shapes, input_shapes, public = manifest["weights"], manifest["inputs"], manifest["public"]
    if role == Role.OWNER:
        with channel.scope("setup"):
            _send_shares(channel, [private[name] for name in weight_shapes], frac_bits)
        return {"stats": channel.summary()}
    if role == Role.CLIENT:
        with channel.scope("setup"):
            _send_shares(channel, private, frac_bits)
        start = time.perf_counter()
        outputs = []
        for _ in range(manifest["outputs"]):
            outputs.append(decode(channel.recv(SERVER0) + channel.recv(SERVER1), frac_bits))
        return {"outputs": outputs, "stats": channel.summary(), "seconds": time.perf_counter() - start}

    if role == Role.DEALER:
        seeds = tuple(os.urandom(16) for _ in _SERVERS)
        for server, seed in zip(_SERVERS, seeds):
            channel.send(torch.frombuffer(bytearray(seed), dtype=torch.int64), server)
        mpc = MPC(DEALER, channel, seeds, frac_bits)
        start = time.perf_counter()
        with channel.scope("offline"):
            derived, matrices = program.derive({n: _meta(s) for n, s in weight_shapes.items()})
            weights = prepare_weights(mpc, derived, matrices)
            program.forward(mpc, weights, [mpc.placeholder(s) for s in input_shapes], public)
            nbytes = mpc.send_offline()
        return {"offline_bytes": nbytes, "offline_seconds": time.perf_counter() - start, "stats": channel.summary()}

    owner, client = int(Role.OWNER), int(Role.CLIENT)
    with channel.scope("setup"):
        seed = channel.recv(DEALER, shape=(2,), dtype=torch.int64).numpy().tobytes()
        mpc = MPC(int(role), channel, seed, frac_bits)
        raw = {name: channel.recv(owner, shape=shape, dtype=torch.int64) for name, shape in weight_shapes.items()}
        derived, matrices = program.derive(raw)
        weights = prepare_weights(mpc, derived, matrices)
        inputs = [mpc.shared(channel.recv(client, shape=s, dtype=torch.int64)) for s in input_shapes]
        if role == SERVER1:
            mpc.receive_offline()
    start = time.perf_counter()
    with channel.scope("online"):
        outputs = program.forward(mpc, weights, inputs, public)
        for out in outputs:
            channel.send(out.share, client)
    return {"online_seconds": time.perf_counter() - start, "stats": channel.summary()}


def _meta(shape) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=torch.int64, device="meta")


def run_program(program, inputs: list[torch.Tensor], weights: dict[str, torch.Tensor] | None = None,
                public: dict | None = None, n_outputs: int = 1, frac_bits: int = DEFAULT_FRAC_BITS,
                timeout_s: float = 120.0, threads: int = 1) -> tuple[list[torch.Tensor], dict]:
    """Evaluate ``program`` on shared inputs and weights; return (decoded outputs, per-role reports)."""
    weights = weights or {}
    manifest = {
        "weights": {name: tuple(t.shape) for name, t in weights.items()},
        "inputs": [tuple(x.shape) for x in inputs],
        "public": public or {},
        "outputs": n_outputs,
    }
    private = {Role.CLIENT: inputs, Role.OWNER: weights}
    args = {role: (program, private.get(role), manifest, frac_bits) for role in Role}
    results = run_parties(_party, args, timeout_s=timeout_s, threads=threads)
    return results[Role.CLIENT]["outputs"], {r.name: v for r, v in results.items()}


@dataclass(frozen=True)
class FunctionProgram:
    """A weightless program from a module-level function ``fn(mpc, *inputs) -> list[Shared]``."""

    fn: object

    def derive(self, weights):
        return weights, set()

    def forward(self, mpc, weights, inputs, public):
        return self.fn(mpc, *inputs)


def secure_eval(fn, inputs: list[torch.Tensor], n_outputs: int | None = None, **kwargs):
    """``run_program`` for a weightless function; ``n_outputs`` defaults to a dry count on plain inputs."""
    if n_outputs is None:
        n_outputs = _count_outputs(fn, inputs)
    return run_program(FunctionProgram(fn), inputs, n_outputs=n_outputs, **kwargs)


def _count_outputs(fn, inputs) -> int:
    """How many values ``fn`` returns, found by a dealer-style replay on shapes (no data, no messages)."""
    mpc = MPC(DEALER, None, (bytes(16), bytes(16)))
    return len(fn(mpc, *[mpc.placeholder(x.shape) for x in inputs]))
