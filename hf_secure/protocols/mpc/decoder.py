"""Causal decoders (GPT-2, Llama) under two-party secret sharing, with the KV cache kept as shares.

A query carries, besides the private one-hot rows of the new token ids, public fields:

* ``attention_mask`` ``(batch, past + new)``: 1 where a position may be attended (padding is 0);
* ``position_ids`` ``(batch, new)``;
* ``cache`` (one id), ``past_length`` (tokens of that cache to continue from: 0 starts afresh, less
  than cached crops), ``logits_to_keep`` (the last n positions get logits; 0: all), ``drop``
  (ids of caches to free), ``token_only`` (1: the output is each kept position's most likely token,
  computed on shares, instead of its logits).

KV cache: a server keeps, per cache id and layer, its shares of every key and value, each with a
fixed mask opened once when its token is computed (:func:`.layers.fix`). Later attention steps
open only the query side (``q`` for the scores, the probabilities for the values): per generated
token the traffic grows with the hidden size, not with the cached length times it. The dealer,
replaying each query on shapes, keeps the matching masks (it knows them from the seeds), so both
caches evolve identically. The lengths involved are public, as is everything in ``public``.

Output: logits of the kept positions, or with ``token_only`` their argmax only
(:func:`.comparison.argmax`, after a range check of the logits), reconstructed by the client only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import InvalidInputError
from .approximations import Approximations, scope
from .comparison import argmax
from .core import MPC, Shared
from .layers import SharedWeight, fix, linear
from .ranges import FINE, expect_within

# The argmax compares logits truncated to 8 fractional bits on 20-bit lanes: differences below
# 2^19 / 2^8 = 2048, so the logits are range-checked to |l| <= 1000; entries closer than 2^-7 (each
# truncated to 2^-8 independently, one unit either way) may be ordered either way (the
# approximations' own error on logits is larger).
ARGMAX_COMPARISON = (20, 8)
ARGMAX_LIMIT = 1000.0


def cached_layers(state: dict, public: dict, crop):
    """The query's cache bookkeeping, shared by the decoders of every protocol: drop the caches
    ``public["drop"]`` names, then ``(caches, cache id, past length, per-layer (keys, values) cut
    to the past by ``crop(tensor, past)``, or None)``. Raises InvalidInputError for a past longer
    than the cache."""
    caches = state.setdefault("caches", {})
    for cache_id in public["drop"].tolist():
        caches.pop(cache_id, None)
    cache_id, past = int(public["cache"].item()), int(public["past_length"].item())
    cached = caches.get(cache_id) if past else None
    if past:
        length = cached[0][0].shape[2] if cached else 0
        if past > length:
            raise InvalidInputError(f"cache {cache_id} holds {length} tokens, asked to continue from {past}")
        cached = [(crop(k, past), crop(v, past)) for k, v in cached]
    return caches, cache_id, past, cached


def attention_keep(attention_mask: torch.Tensor, past: int, new: int) -> torch.Tensor:
    """Public 0/1 mask ``(batch, 1, new, past + new)``: causal and padding."""
    total = attention_mask.shape[-1]
    if total != past + new:
        raise InvalidInputError(f"attention_mask covers {total} positions, expected past {past} + new {new}")
    causal = torch.arange(total)[None, :] <= (past + torch.arange(new))[:, None]
    return (causal[None, None] & attention_mask[:, None, None, :].bool()).to(torch.int64)


def split_heads(x: Shared, heads: int) -> Shared:
    """``[batch, seq, heads * d] -> [batch, heads, seq, d]`` (local)."""
    batch, seq, width = x.shape
    return x.reshape(batch, seq, heads, width // heads).transpose(1, 2)


def cached_attention(q: Shared, k: Shared, v: Shared, cache: tuple[SharedWeight, SharedWeight] | None,
                     keep: torch.Tensor, scaling: float, approx: Approximations):
    """Attention of new queries over cached and new keys/values; returns (context, updated cache).

    ``q``: ``[b, heads, new, d]``; ``k``, ``v``: ``[b, kv_heads, new, d]`` (grouped-query
    attention repeats each key/value head ``heads / kv_heads`` times, locally). Rounds: one to fix
    the new keys and values, one for the scores, the softmax's, one for the context.
    """
    mpc = q.mpc
    keys, values = fix(mpc, k, v)
    if cache is not None:
        keys, values = cache[0].cat(keys, 2), cache[1].cat(values, 2)
    groups = q.shape[1] // k.shape[1]
    scores = linear(q, keys.repeat_interleave(groups, 1).transpose(2, 3), scale=scaling)
    probs = approx.attention_probs(scores, keep)
    context = linear(probs, values.repeat_interleave(groups, 1))
    batch, heads, new, d = context.shape
    return context.transpose(1, 2).reshape(batch, new, heads * d), (keys, values)


@dataclass(frozen=True)
class DecoderProgram:
    """The parts every causal family shares: caches, masks, layers in scopes, the LM head.

    A family defines ``derive`` (weights by state-dict key -> program weights), ``embed``,
    ``layer`` and ``final_norm``, and may add public constants computed once per query
    (``with_constants``) and a length limit (``check_length``); ``num_layers`` and ``approx`` are
    its fields.
    """

    num_layers: int
    approx: Approximations

    def forward(self, mpc: MPC, w: dict, inputs: list[Shared], public: dict, state: dict) -> list[Shared]:
        """One query: one-hot rows ``[b, new, vocab]`` and the public fields of the module docstring
        to the logits ``[b, kept, vocab]`` (or with ``token_only`` the token ids ``[b, kept]``, fixed
        point). Raises InvalidInputError for a cache or mask that does not fit."""
        caches, cache_id, past, cached = cached_layers(state, public, lambda t, n: t.narrow(2, n))
        (onehot,) = inputs
        self.check_length(past + onehot.shape[1])
        keep = attention_keep(public["attention_mask"], past, onehot.shape[1])
        public = self.with_constants(public)
        h = self.embed(mpc, w, onehot, public)
        layers = []
        for i in range(self.num_layers):
            with scope(mpc, f"layer.{i}"):
                h, kv = self.layer(mpc, w, i, h, keep, public, cached[i] if cached else None)
                mpc.see("output share", h.share)
            layers.append(kv)
        caches[cache_id] = layers
        n = int(public["logits_to_keep"].item())
        if n:
            h = h[:, -n:]
        with scope(mpc, "lm_head"):
            logits = linear(self.final_norm(w, h), w["lm_head"])
        if not int(public["token_only"].item()):
            return [logits]
        with scope(mpc, "argmax"):
            expect_within(logits, -ARGMAX_LIMIT, ARGMAX_LIMIT, "logits (argmax input)", FINE)
            return [argmax(logits, *ARGMAX_COMPARISON)]

    def check_length(self, length: int) -> None:
        """Refuse (InvalidInputError) a sequence of ``length`` positions the family cannot attend
        over as the plaintext model does; every length is fine by default."""

    def with_constants(self, public: dict) -> dict:
        """``public`` plus what every layer needs and only the public fields determine."""
        return public
