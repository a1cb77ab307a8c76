"""BERT, GPT-2 and Llama-like decoders on masked values (Sigma's programs, unmodified models).

The weights keep transformers' state-dict keys; the model owner lays them out with the mpc
programs' ``derive`` (linear re-layouts: transposes, fused Q/K/V), encodes them with ``f``
fractional bits and shares them; at setup they are opened once under masks the dealer keeps for
the session (:mod:`.run`). A query's private input is the one-hot rows of its token ids; the
public fields (positions, masks, cache ids) are those of :mod:`..mpc.decoder` and
:mod:`..mpc.bert`. The activation is the checkpoint's own (GeLU, GeLU-tanh, SiLU: Sigma's
tables), softmax and the norms are exact up to their tables (:mod:`.nonlinear`): no conversion.

Every function runs on the servers (masked values) and on the dealer (masks) alike.

Round structure per layer (BERT): a linear layer is a product opened, truncated (its borrow
bits opened) and opened (3 rounds); attention adds the scores (3), softmax (``2 log2 L + 10``),
the context (3); a norm 14, the activation 3 and its opening. Each query ends with the range
checks' 2 rounds (:mod:`.ranges`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...errors import UnsupportedModelError
from ..mpc.bert import BertProgram
from ..mpc.decoder import attention_keep, cached_layers
from ..mpc.gpt2 import GPT2Program
from ..mpc.llama import LlamaProgram
from ..mpc.approximations import Approximations
from ..mpc.ring import encode
from .core import FSS, Masked, Shares
from . import nonlinear as nl


def linear(ctx: FSS, x: Masked, weight: Masked, bias: Masked | None = None) -> Shares:
    """``x @ W (+ b)`` with ``f`` fractional bits: the product opened (round 1), truncated (round
    2) and returned as shares (the caller adds a residual, then opens: round 3)."""
    (z,) = ctx.reveal(ctx.product(x, weight, ctx.matmul))
    out = ctx.truncate(z, ctx.params.frac_bits)
    return out if bias is None else out + bias


def opened(ctx: FSS, x: Shares) -> Masked:
    (m,) = ctx.reveal(x)
    return m


def split_heads(x: Masked, heads: int) -> Masked:
    """``[b, s, heads * d] -> [b, heads, s, d]`` (local)."""
    b, s, width = x.shape
    return x.apply(lambda t: t.reshape(b, s, heads, width // heads).transpose(1, 2))


def merge_heads(x: Masked) -> Masked:
    b, h, s, d = x.shape
    return x.apply(lambda t: t.transpose(1, 2).reshape(b, s, h * d))


def attention(ctx: FSS, q: Masked, k: Masked, v: Masked, keep: torch.Tensor, scaling: float) -> Masked:
    """``softmax(q k^T * scaling + mask) v`` on ``[b, heads, s, d]`` (keys/values may have fewer
    heads: grouped-query attention repeats them locally). ``scaling`` multiplies ``q`` as a
    public fixed-point constant before the product, so the scores are truncated once."""
    f = ctx.params.frac_bits
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.apply(lambda t: t.repeat_interleave(groups, 1))
        v = v.apply(lambda t: t.repeat_interleave(groups, 1))
    log2 = math.log2(1 / scaling)
    kt = k.apply(lambda t: t.transpose(-1, -2).contiguous())
    if log2.is_integer():  # a power of two: folded into the truncation
        scores, shift = ctx.product(q, kt, ctx.matmul), f + int(log2)
    else:
        scores, shift = ctx.product(q.mul_public(round(scaling * (1 << f))), kt, ctx.matmul), 2 * f
    # only the kept scores (the causal triangle, the unpadded keys) are opened and go on
    rows = keep.bool().expand(scores.shape).reshape(-1, scores.shape[-1])
    index = rows.reshape(-1).nonzero().squeeze(1)
    (kept,) = ctx.reveal(scores.apply(lambda t: t.reshape(-1)[index]))
    kept = opened(ctx, ctx.truncate(kept, shift))
    probs = Masked.zeros(ctx, scores.shape, kept.bits).put(index, nl.softmax_kept(ctx, kept, rows))
    (context,) = ctx.reveal(ctx.product(probs, v, ctx.matmul))
    return opened(ctx, ctx.truncate(context, f))


def _rows(table: Masked, ids: torch.Tensor) -> Masked:
    return table.apply(lambda t: t[ids])


@dataclass(frozen=True)
class FSSBert:
    """A BERT encoder (``BertModel`` keys): final hidden states ``[b, s, hidden]``."""

    layout: BertProgram
    activation: str = "gelu"

    @classmethod
    def from_config(cls, config, from_embeddings: bool = False) -> "FSSBert":
        """``from_embeddings``: the input is the embeddings' output ``[b, s, hidden]`` (float, sent
        in fixed point) instead of one-hot token rows; the encoder alone runs under fss."""
        if config.hidden_act not in nl.ACTIVATIONS:
            raise UnsupportedModelError(f"BERT with activation {config.hidden_act!r}: fss computes {sorted(nl.ACTIVATIONS)}")
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise UnsupportedModelError("BERT with relative position embeddings is not supported by fss")
        return cls(BertProgram.from_config(config, Approximations(), from_embeddings), config.hidden_act)

    def derive(self, w):
        return self.layout.derive(w)

    def forward(self, ctx: FSS, w: dict, inputs: list[Masked], public: dict, state: dict) -> list[Shares]:
        (h,) = inputs
        lay = self.layout
        mask = public["attention_mask"]
        keep = mask[:, None, None, :].bool()
        if not lay.from_embeddings:  # one-hot rows are integers: the product needs no truncation
            h = ctx.product(h, w["embed"], ctx.matmul)
            h = h + _rows(w["pos"], public["position_ids"]) + _rows(w["type"], public["token_type_ids"])
            h = opened(ctx, nl.normalize(ctx, opened(ctx, h), w["emb_ln.w"], w["emb_ln.b"], lay.eps, True))
        width = h.shape[-1]
        for i in range(lay.num_layers):
            with ctx.scope(f"layer.{i}"):
                h = self._layer(ctx, w, i, h, keep, width)
        return [h.to_shares()]

    def _layer(self, ctx: FSS, w: dict, i: int, h: Masked, keep, width: int) -> Masked:
        lay = self.layout
        qkv = opened(ctx, linear(ctx, h, w[f"{i}.qkv"], w[f"{i}.qkv.b"]))
        q, k, v = (split_heads(qkv.apply(lambda t, j=j: t[..., j * width:(j + 1) * width]), lay.num_heads)
                   for j in range(3))
        context = merge_heads(attention(ctx, q, k, v, keep, (width // lay.num_heads) ** -0.5))
        h = opened(ctx, linear(ctx, context, w[f"{i}.o"], w[f"{i}.o.b"]) + h)
        h = opened(ctx, nl.normalize(ctx, h, w[f"{i}.ln1.w"], w[f"{i}.ln1.b"], lay.eps, True))
        inner = opened(ctx, linear(ctx, h, w[f"{i}.ffn1"], w[f"{i}.ffn1.b"]))
        inner = opened(ctx, nl.activation(ctx, inner, self.activation))
        h = opened(ctx, linear(ctx, inner, w[f"{i}.ffn2"], w[f"{i}.ffn2.b"]) + h)
        h = opened(ctx, nl.normalize(ctx, h, w[f"{i}.ln2.w"], w[f"{i}.ln2.b"], lay.eps, True))
        return h


@dataclass(frozen=True)
class FSSDecoder:
    """GPT-2 and Llama-like decoders: logits of the kept positions, KV cache kept masked.

    ``state["caches"][id]`` holds per layer the masked keys and values of the cached positions
    (on the dealer: their masks), so a new token's attention reuses them: its keys and values are
    opened once, when computed.
    """

    layout: GPT2Program | LlamaProgram
    activation: str
    family: str
    norm_centered: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config, family: str) -> "FSSDecoder":
        if family == "gpt2":
            act = config.activation_function
            if act not in nl.ACTIVATIONS:
                raise UnsupportedModelError(f"GPT-2 with activation {act!r}: fss computes {sorted(nl.ACTIVATIONS)}")
            return cls(GPT2Program.from_config(config, Approximations()), act, family, True)
        if config.hidden_act != "silu":
            raise UnsupportedModelError(f"{config.model_type} with activation {config.hidden_act!r} (fss computes SiLU)")
        return cls(LlamaProgram.from_config(config, Approximations()), "silu", family, False)

    def derive(self, w):
        return self.layout.derive(w)

    def check_length(self, length: int) -> None:
        self.layout.check_length(length)

    def forward(self, ctx: FSS, w: dict, inputs: list[Masked], public: dict, state: dict) -> list[Shares]:
        lay = self.layout
        caches, cache_id, past, cached = cached_layers(state, public, lambda x, n: x.apply(lambda t: t[:, :, :n]))
        (onehot,) = inputs
        self.check_length(past + onehot.shape[1])
        keep = attention_keep(public["attention_mask"], past, onehot.shape[1])
        public = lay.with_constants(public)
        h = ctx.product(onehot, w["embed"], ctx.matmul)
        if self.family == "gpt2":
            h = h + _rows(w["pos"], public["position_ids"])
        h = opened(ctx, h)
        layers = []
        for i in range(lay.num_layers):
            with ctx.scope(f"layer.{i}"):
                h, kv = self._layer(ctx, w, i, h, keep, public, cached[i] if cached else None)
            layers.append(kv)
        caches[cache_id] = layers
        n = int(public["logits_to_keep"].item())
        if n:
            h = h.apply(lambda t: t[:, -n:])
        h = opened(ctx, self._norm(ctx, w, h, "final"))
        return [linear(ctx, h, w["lm_head"])]

    def _norm(self, ctx: FSS, w: dict, x: Masked, site: str) -> Shares:
        return nl.normalize(ctx, x, w[site + ".w"], w.get(site + ".b"), self.layout.eps, self.norm_centered)

    def _layer(self, ctx: FSS, w: dict, i: int, h: Masked, keep, public: dict, cache):
        lay = self.layout
        x = opened(ctx, self._norm(ctx, w, h, f"{i}.ln1"))
        qkv = opened(ctx, linear(ctx, x, w[f"{i}.qkv"], w.get(f"{i}.qkv.b")))
        if self.family == "gpt2":
            width = qkv.shape[-1] // 3
            q, k, v = (split_heads(qkv.apply(lambda t, j=j: t[..., j * width:(j + 1) * width]), lay.num_heads)
                       for j in range(3))
            scaling = (width // lay.num_heads) ** -0.5
        else:
            qw, kw = lay.num_heads * lay.head_dim, lay.num_kv_heads * lay.head_dim
            q = split_heads(qkv.apply(lambda t: t[..., :qw]), lay.num_heads)
            k = split_heads(qkv.apply(lambda t: t[..., qw:qw + kw]), lay.num_kv_heads)
            v = split_heads(qkv.apply(lambda t: t[..., qw + kw:]), lay.num_kv_heads)
            cos, sin = public["rope"]
            q, k = _rope(ctx, q, cos, sin), _rope(ctx, k, cos, sin)
            scaling = lay.head_dim ** -0.5
        if cache is not None:
            k = _cat(ctx, cache[0], k)
            v = _cat(ctx, cache[1], v)
        context = merge_heads(attention(ctx, q, k, v, keep, scaling))
        h = opened(ctx, linear(ctx, context, w[f"{i}.o"], w.get(f"{i}.o.b")) + h)
        x = opened(ctx, self._norm(ctx, w, h, f"{i}.ln2"))
        if self.family == "gpt2":
            inner = opened(ctx, linear(ctx, x, w[f"{i}.ffn1"], w[f"{i}.ffn1.b"]))
            inner = opened(ctx, nl.activation(ctx, inner, self.activation))
            out = linear(ctx, inner, w[f"{i}.ffn2"], w[f"{i}.ffn2.b"])
        else:
            gate_up = opened(ctx, linear(ctx, x, w[f"{i}.gate_up"]))
            half = gate_up.shape[-1] // 2
            gate = opened(ctx, nl.activation(ctx, gate_up.apply(lambda t: t[..., :half]), "silu"))
            (inner,) = ctx.reveal(ctx.product(gate, gate_up.apply(lambda t: t[..., half:])))
            inner = opened(ctx, ctx.truncate(inner, ctx.params.frac_bits))
            out = linear(ctx, inner, w[f"{i}.down"])
        return opened(ctx, out + h), (k, v)


def _cat(ctx: FSS, old: Masked, new: Masked) -> Masked:
    share = None if old.share is None or new.share is None else torch.cat([old.share, new.share], dim=2)
    return Masked(ctx, torch.cat([old.data, new.data], dim=2), new.bits, share)


def _rope(ctx: FSS, x: Masked, cos: torch.Tensor, sin: torch.Tensor) -> Masked:
    """``x cos + rotate_half(x) sin`` with transformers' public tables: local products with
    fixed-point constants, one truncation opened (1 round... plus the opening)."""
    f = ctx.params.frac_bits
    half = x.shape[-1] // 2
    rotated = x.apply(lambda t: torch.cat([-t[..., half:], t[..., :half]], dim=-1))
    y = x.mul_public(encode(cos, f)) + rotated.mul_public(encode(sin, f))
    return opened(ctx, ctx.truncate(y, f))


def program_for(config, family: str):
    """The fss program of a plain transformers config of ``family`` (bert, gpt2, llama, mistral, qwen2).
    Raises UnsupportedModelError for the variants the family's spec refuses."""
    from ...families import family as family_spec

    family_spec(family).refuse(config)
    if family == "bert":
        return FSSBert.from_config(config)
    return FSSDecoder.from_config(config, family)
