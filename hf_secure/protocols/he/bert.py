"""BERT encoders on CKKS ciphertexts: the server's program of the he protocol.

The client computes the embeddings (word, position and token type, and their LayerNorm: the model
owner gives it those tables, see the threat model) and sends them encrypted, slot-packed
(:class:`.layout.Layout`); the server runs every encoder layer on ciphertexts with its plaintext
weights and returns the final hidden states encrypted at the lowest level.

Per layer, as transformers' ``BertLayer`` (post-LayerNorm):

* Q, K, V: three :class:`.linear.SlotLinear` products (baby-step giant-step diagonals).
* Scores: for each key offset ``d`` inside a sequence block (``block`` positions, a power of two;
  several sequences can share a ciphertext, one per block), ``K`` shifted by ``d`` tokens (two
  running rotations, by 1 and by 1 - block, and a 0/1 mask), the product with ``Q``, QuickSum over
  the head's features, and the result kept in the score ciphertext ``d // group`` at feature
  position ``d mod group`` (a 0/1 mask that also applies the 1/sqrt(head size) scaling).
* Softmax over the keys (:func:`.operators.softmax`): maximum subtracted, padded and
  out-of-block keys excluded.
* Context: for each ``d``, the probability replicated over the head's features (mask and
  QuickSum) times ``V`` shifted by ``d``.
* Output projection, residual, LayerNorm; FFN with GELU (:func:`.operators.activation`), residual,
  LayerNorm.

Ranges (:class:`Bounds`) are the inputs' ranges the approximations are built for: scores, the
FFN's pre-activations, the LayerNorms' variances. They are properties of the model and its
inputs, measured on plaintext (``calibrate``) and stated with the model; a value outside them
gives a wrong result (CKKS cannot check ranges on the server).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...errors import UnsupportedModelError
from . import operators as op
from .backend import CKKS, Ciphertext
from .layout import Layout
from .linear import SlotLinear


@dataclass(frozen=True)
class Bounds:
    """Input ranges of the approximations: ``|score|`` (after scaling), ``|FFN pre-activation|``,
    and LayerNorm's ``var + eps``."""

    scores: float = 16.0
    activation: float = 8.0
    variance: tuple[float, float] = (0.05, 64.0)


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


MAX_PER_CT = 128  # features per ciphertext at most: the products' rotation keys grow with sqrt of it


def layouts(slots: int, config, block: int) -> tuple[Layout, Layout]:
    """The hidden and FFN layouts for sequences of ``block`` tokens: at most :data:`MAX_PER_CT`
    features per ciphertext, so as many token positions as that leaves (several sequences share
    one), and at least ``block``."""
    group = config.hidden_size // config.num_attention_heads
    tokens = max(block, slots // min(next_power_of_two(config.hidden_size), MAX_PER_CT))
    if tokens > slots // group:
        raise UnsupportedModelError(f"{block} tokens of heads of {group} do not fit {slots} slots")
    return Layout(slots, tokens, config.hidden_size, group), Layout(slots, tokens, config.intermediate_size, group)


class BertProgram:
    """The encoder layers of a BERT checkpoint on one CKKS context.

    ``weights``: float arrays by transformers' state-dict keys of ``BertModel`` (``encoder.layer.
    {i}.…``). ``block``: the sequence block (padded length, a power of two). Raises
    UnsupportedModelError for what it does not implement (non-GELU activations, other position
    embeddings do not matter here: the client embeds).
    """

    def __init__(self, ctx: CKKS, config, weights: dict[str, np.ndarray], block: int, bounds: Bounds = Bounds()):
        self.check(config)
        self.activation = "gelu" if config.hidden_act == "gelu" else "gelu_tanh"
        self.ctx, self.config, self.bounds = ctx, config, bounds
        self.block = next_power_of_two(block)
        slots = ctx.params.slots
        self.layout, self.ff_layout = layouts(slots, config, self.block)
        self.group, tokens = self.layout.group, self.layout.tokens
        self.eps = config.layer_norm_eps
        self.layers = [self._layer(weights, f"encoder.layer.{i}.") for i in range(config.num_hidden_layers)]
        lay = self.layout
        t = np.arange(slots) % tokens  # the token of each slot
        self.shift_masks = [((t % self.block) + s < self.block).astype(np.float64) for s in range(self.block)]
        feature = (np.arange(slots) // (lay.heads_per_ct * tokens)) % self.group  # feature index in its head
        self.select = [(feature == i).astype(np.float64) for i in range(self.group)]

    def _layer(self, w: dict[str, np.ndarray], p: str) -> dict:
        lay, ff = self.layout, self.ff_layout

        def linear(name, lin, lout):
            return SlotLinear(self.ctx, np.asarray(w[f"{p}{name}.weight"], dtype=np.float64).T,
                              np.asarray(w[f"{p}{name}.bias"], dtype=np.float64), lin, lout)

        return {
            "q": linear("attention.self.query", lay, lay), "k": linear("attention.self.key", lay, lay),
            "v": linear("attention.self.value", lay, lay), "o": linear("attention.output.dense", lay, lay),
            "ff1": linear("intermediate.dense", lay, ff), "ff2": linear("output.dense", ff, lay),
            "ln1": (lay.per_feature(w[f"{p}attention.output.LayerNorm.weight"]),
                    lay.per_feature(w[f"{p}attention.output.LayerNorm.bias"])),
            "ln2": (lay.per_feature(w[f"{p}output.LayerNorm.weight"]),
                    lay.per_feature(w[f"{p}output.LayerNorm.bias"])),
        }

    @staticmethod
    def check(config) -> None:
        """UnsupportedModelError for what the program does not run: activations other than GELU,
        head sizes that are not powers of two, absolute position embeddings aside (the client
        embeds)."""
        act = getattr(config, "hidden_act", "gelu")
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise UnsupportedModelError(f"protocol 'he' runs BERT with GELU activations, not {act!r}")
        group = config.hidden_size // config.num_attention_heads
        if group & (group - 1) or group * config.num_attention_heads != config.hidden_size:
            raise UnsupportedModelError(f"protocol 'he' needs a power-of-two head size, not {config.hidden_size}"
                                        f"/{config.num_attention_heads}")

    @staticmethod
    def steps_needed(ctx: CKKS, config, block: int) -> set[int]:
        """The rotation steps the server needs for sequences of ``block``: token shifts by 1 and
        ``-block``, folds by ``tokens 2^i``, and the products' baby and giant steps."""
        block = next_power_of_two(block)
        lay, ff = layouts(ctx.params.slots, config, block)
        steps = {1, -block} | {lay.tokens << i for i in range(int(math.log2(lay.per_ct)))}
        return steps | set(SlotLinear.steps(lay)) | set(SlotLinear.steps(ff))

    # -- one query ------------------------------------------------------------------------------
    def forward(self, x: list[Ciphertext], valid: np.ndarray, refresh, on_layer=None) -> list[Ciphertext]:
        """The final hidden states of the embeddings ``x`` (``layout.count`` ciphertexts);
        ``valid``: ``[tokens]`` 0/1, the real (unpadded) token positions (keys to attend to).
        ``on_layer``: called after each layer (progress)."""
        keep = self._keys(valid)
        for layer in self.layers:
            x = self._layer_forward(layer, x, keep, refresh)
            if on_layer is not None:
                on_layer()
        return x

    def _linear(self, lin: SlotLinear, cts: list[Ciphertext], refresh) -> list[Ciphertext]:
        """The product at the lowest level that takes it (its rotations cost about the square of
        the primes left; refreshing the outputs costs less)."""
        return lin([op.fit(c, 1, refresh) for c in cts])

    def _layer_forward(self, w: dict, x: list[Ciphertext], keep: list[np.ndarray], refresh) -> list[Ciphertext]:
        ctx, lay = self.ctx, self.layout
        x_low = [op.fit(c, 1, refresh) for c in x]
        q, k, v = w["q"](x_low), w["k"](x_low), w["v"](x_low)
        context = [self._attention(qc, kc, vc, keep, refresh) for qc, kc, vc in zip(q, k, v)]
        attn = self._linear(w["o"], context, refresh)
        h = op.layer_norm(ctx, [a + r for a, r in zip(attn, x)], lay.per_ct, lay.tokens, *w["ln1"], self.eps,
                          *self.bounds.variance, refresh=refresh, size=lay.width)
        inner = self._linear(w["ff1"], h, refresh)
        inner = [op.activation(ctx, c, self.activation, self.bounds.activation, refresh=refresh) for c in inner]
        out = self._linear(w["ff2"], inner, refresh)
        return op.layer_norm(ctx, [a + r for a, r in zip(out, h)], lay.per_ct, lay.tokens, *w["ln2"], self.eps,
                             *self.bounds.variance, refresh=refresh, size=lay.width)

    def _shifted(self, x: Ciphertext, need: int, refresh):
        """``(d, x shifted by d tokens inside each block)`` for ``d = 0 .. block - 1``, each with
        ``need`` levels to spend: running rotations by 1 of ``x`` and of ``x`` rotated by
        ``-block``, merged by 0/1 masks (one level), at the lowest level that leaves ``need``."""
        ctx = self.ctx
        x = op.fit(x, need + 1, refresh)
        low, high = x, ctx.rotate(x, -self.block)
        for d in range(self.block):
            if d:
                low, high = ctx.rotate(low, 1), ctx.rotate(high, 1)
            mask = self.shift_masks[d]
            part = ctx.multiply_plain(low, mask)
            yield d, part if d == 0 else part + ctx.multiply_plain(high, 1.0 - mask)

    def _attention(self, q: Ciphertext, k: Ciphertext, v: Ciphertext, keep: list[np.ndarray], refresh) -> Ciphertext:
        """Attention of the heads of one ciphertext; ``keep``: :meth:`_keys`. Every input is
        brought to the lowest level its path needs (rotations there cost a fraction of the top
        level's): scores ``q k_d`` then a 0/1 mask (2 levels); the context ``p_d v_d`` (2 levels,
        and one left for the output projection)."""
        ctx, lay, g = self.ctx, self.layout, self.group
        stride = lay.heads_per_ct * lay.tokens
        scaling = 1 / math.sqrt(g)
        q = op.fit(q, 2, refresh)
        count = max(1, self.block // g)
        scores: list[Ciphertext | None] = [None] * count
        for d, kd in self._shifted(k, 2, refresh):
            prod = op.quick_sum(ctx, ctx.multiply(q, kd), g, stride)
            term = ctx.multiply_plain(prod, self.select[d % g] * scaling)
            b = d // g
            scores[b] = term if scores[b] is None else scores[b] + term
        span = self.block if self.block < g else None  # keys fill only the first positions of the vector
        probs = op.softmax(ctx, scores, g, stride, self.bounds.scores, refresh, keep, span=span)
        probs = [op.fit(p, 3, refresh) for p in probs]
        out = None
        for d, vd in self._shifted(v, 2, refresh):
            rep = op.quick_sum(ctx, ctx.multiply_plain(probs[d // g], self.select[d % g]), g, stride)
            term = ctx.multiply(rep, vd)
            out = term if out is None else out + term
        return out

    def _keys(self, valid: np.ndarray) -> list[np.ndarray]:
        """0/1 per score slot: key offset ``d`` of the slot's query is inside the block and a real
        token."""
        lay, g = self.layout, self.group
        slots = np.arange(self.ctx.params.slots)
        t = slots % lay.tokens
        i = (slots // (lay.heads_per_ct * lay.tokens)) % g
        out = []
        for b in range(max(1, self.block // g)):
            d = b * g + i
            key = t - t % self.block + (t % self.block + d) % self.block
            out.append(((d < self.block) & (valid[key] > 0)).astype(np.float64))
        return out
