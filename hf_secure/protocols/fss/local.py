"""Run an FSS program with all three parties in this process: the dealer first, then both servers
in two threads joined by in-memory queues. For tests and for cost accounting of single
protocols; models run through the multi-process runtime (:mod:`.run`).
"""

from __future__ import annotations

import os
import queue
import threading
import time

import torch

from ...accounting import Traffic
from ...errors import PartyFailedError
from ..mpc.prg import PRG
from ..mpc.ranges import refusal
from ..mpc.ring import encode
from .core import DEALER, FSS, KeySink, Params, Shares, new_seeds, key_id, wrap
from .keyfile import KeyReader, KeyWriter
from .ranges import verify_ranges


class LocalLink:
    """Both ends of a server-to-server link in one process, counting bytes and rounds."""

    def __init__(self, timeout_s: float = 60.0):
        self.queues = (queue.Queue(), queue.Queue())  # queues[r]: messages to server r
        self.stats = (Traffic(), Traffic())
        self.timeout_s = timeout_s

    def end(self, role: int) -> "_End":
        return _End(self, role)


class _End:
    def __init__(self, link: LocalLink, role: int):
        self.link, self.role = link, role

    def exchange_many(self, tensors: list[torch.Tensor], peer: int) -> list[torch.Tensor]:
        self.link.queues[peer].put([t.clone() for t in tensors])
        try:
            got = self.link.queues[self.role].get(timeout=self.link.timeout_s)
        except queue.Empty as err:
            raise PartyFailedError(f"server {self.role}: no message from server {peer}") from err
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        stats = self.link.stats[self.role]
        stats.bytes_sent += nbytes
        stats.bytes_received += sum(t.numel() * t.element_size() for t in got)
        stats.messages += 1
        stats.rounds += 1
        return got


def run_local(program, inputs: list[torch.Tensor], params: Params = Params(), device: str = "cpu",
              backend: str | None = None, input_bits: list[int] | None = None, key_dir: str | None = None,
              variants: list[dict] | None = None):
    """Run ``program(ctx, masked_inputs) -> list of Shares/Masked`` on integer ``inputs``.

    ``key_dir``: write the servers' keys there (files, read back record by record) instead of
    memory. Returns ``(outputs, report)``: the opened outputs (signed int64) and per server its
    traffic (in all, and of the inputs' opening), key size in bytes and seconds online (after the
    inputs' opening); the dealer's seconds. ``variants`` (in-memory keys only): run the servers
    once per dict of :class:`.core.FSS` settings (``device``, ``backend``, ``limb_products``) on
    the same keys and input shares, and return the list of each run's outputs instead: the CUDA
    path's host logic is tested bit for bit against the CPU path this way.
    """
    input_bits = input_bits or [params.ring_bits] * len(inputs)
    if variants is not None and key_dir is not None:
        raise ValueError("variants replay in-memory keys")
    keys, key_bytes, dealer_seconds = _deal(program, inputs, params, input_bits, key_dir)
    split = []  # the client's additive shares of each input
    for x in inputs:
        share0 = PRG.fresh().ring(x.shape)
        split.append([share0, x - share0])
    if variants is not None:
        return [_serve(program, keys, [list(s) for s in split], params, input_bits, v)[0] for v in variants], None
    results, report = _serve(program, keys, split, params, input_bits,
                             {"device": device, "backend": backend})
    return results, {**report, "key_bytes": key_bytes, "dealer_seconds": dealer_seconds}


def _deal(program, inputs, params, input_bits, key_dir):
    """The dealer's run on masks: both servers' keys (bytes, or file paths under ``key_dir``)."""
    seeds = new_seeds()
    header = {"key_id": key_id(seeds), "params": params.as_dict()}
    paths = [None, None] if key_dir is None else [os.path.join(key_dir, f"key-{p}.bin") for p in (0, 1)]
    writers = [KeyWriter(paths[p], {**header, "party": p, "seed": seeds[p].hex()}) for p in (0, 1)]
    start = time.perf_counter()
    dealer = FSS(DEALER, seeds, KeySink(writers), params=params)
    dealt = [dealer.reveal(Shares(dealer, torch.empty(x.shape, dtype=torch.int64, device="meta"), b))[0]
             for x, b in zip(inputs, input_bits)]
    outputs = program(dealer, dealt)
    verify_ranges(dealer)
    for out in outputs:
        dealer.open(out)
    keys = [w.close() for w in writers]
    return (paths if key_dir is not None else keys), [w.nbytes for w in writers], time.perf_counter() - start


def _serve(program, keys, split, params, input_bits, settings: dict):
    """Both servers in two threads on ``keys`` and the client's shares ``split``."""
    link = LocalLink()
    results, errors, seconds, inputs_traffic = [None, None], [], [0.0, 0.0], [None, None]
    device = settings.get("device", "cpu")

    def server(role: int):
        try:
            reader = KeyReader(keys[role], expect={"party": role})
            ctx = FSS(role, bytes.fromhex(reader.header["seed"]), reader, link.end(role), params, **settings)
            begin = time.perf_counter()
            masked = []
            for s, b in zip(split, input_bits):  # one opening each: large weights need no second copy
                (m,) = ctx.reveal(Shares(ctx, wrap(s[role].to(device), b), b))
                s[role] = None  # the client's shares are gone once sent
                masked.append(m)
            inputs_traffic[role] = link.stats[role].snapshot()
            outputs = program(ctx, masked)
            out_of_range = verify_ranges(ctx)
            seconds[role] = time.perf_counter() - begin
            if out_of_range:
                raise refusal(out_of_range)
            results[role] = [ctx.open(out).cpu() for out in outputs]
            reader.finish()
        except BaseException as err:  # noqa: BLE001 - reported to the caller below
            errors.append(err)

    threads = [threading.Thread(target=server, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results[0], {"traffic": [s.snapshot() for s in link.stats], "inputs_traffic": inputs_traffic,
                        "online_seconds": seconds}


def run_model_local(program, weights: dict[str, torch.Tensor], input_ids: torch.Tensor, public: dict,
                    vocab_size: int, params: Params = Params(), state: tuple[dict, dict, dict] | None = None,
                    key_dir: str | None = None, variants: list[dict] | None = None, device: str = "cpu"):
    """One query of a model program (:mod:`.models`) with every party in this process: the owner's
    ``weights`` (float, by state-dict key) and the one-hot rows of ``input_ids`` (integer), or
    float ``input_ids`` as they are (an encoder from its embeddings). ``state``: the dealer's and
    both servers' program state, kept across calls (KV caches). Returns ``(float outputs, report)``."""
    derived, _ = program.derive(weights)
    names = sorted(derived)
    f = params.frac_bits
    first = encode(input_ids, f) if input_ids.is_floating_point() else torch.nn.functional.one_hot(input_ids, vocab_size).long()
    inputs = [first] + [encode(derived[n], f) for n in names]
    states = {}
    if state is not None:
        states = {DEALER: state[0], 0: state[1], 1: state[2]}

    def fn(ctx, masked):
        w = dict(zip(names, masked[1:]))
        return program.forward(ctx, w, masked[:1], public, states.setdefault(ctx.role, {}))

    outs, report = run_local(fn, inputs, params, device=device, key_dir=key_dir, variants=variants)
    if variants is not None:
        return outs, None
    return [o.double() / (1 << params.frac_bits) for o in outs], report
