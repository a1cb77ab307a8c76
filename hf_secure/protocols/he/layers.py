"""What every transformer program of the he protocol shares: layouts, ranges, linear layers and
attention on slot-packed ciphertexts.

Attention of one ciphertext of heads (:class:`.layout.Layout`, ``block`` token positions per
sequence, a power of two):

* Scores: for each key offset ``d`` inside a sequence block, ``K`` shifted by ``d`` tokens (two
  running rotations, by 1 and by 1 - block, and a 0/1 mask), the product with ``Q``, QuickSum over
  the head's features, and the result kept in the score ciphertext ``d // group`` at feature
  position ``d mod group`` (a 0/1 mask that also applies the 1/sqrt(head size) scaling).
* Softmax over the keys (:func:`.operators.softmax`): maximum subtracted, the keys the ``keep``
  masks exclude (padding, out-of-block, future keys of a causal model) weigh 0.
* Context: for each ``d``, the probability replicated over the head's features (mask and
  QuickSum) times ``V`` shifted by ``d``.

Ranges (:class:`Bounds`) are the inputs' ranges the approximations are built for: scores, the
FFN's pre-activations, the normalisations' variances (mean squares for RMSNorm). They are
properties of the model and its inputs, measured on plaintext (:func:`calibrate`) and stated with
the model; a value outside them gives a wrong result (CKKS cannot check ranges on the server).
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import UnsupportedModelError
from . import operators as op
from .backend import CKKS, Ciphertext
from .layout import Layout
from .linear import SlotLinear


@dataclass(frozen=True)
class Bounds:
    """Input ranges of the approximations: ``|score|`` (after scaling), ``|FFN pre-activation|``,
    and the normalisations' ``var + eps`` (RMSNorm: ``mean x^2 + eps``)."""

    scores: float = 16.0
    activation: float = 8.0
    variance: tuple[float, float] = (0.05, 64.0)


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


MAX_PER_CT = 128  # features per ciphertext at most: the products' rotation keys grow with sqrt of it


def ffn_width(config) -> int:
    """The FFN's inner width (GPT-2: ``n_inner``, default 4 hidden)."""
    width = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    return width or 4 * config.hidden_size


def layouts(slots: int, config, block: int) -> tuple[Layout, Layout]:
    """The hidden and FFN layouts for sequences of ``block`` tokens: at most :data:`MAX_PER_CT`
    features per ciphertext, so as many token positions as that leaves (several sequences share
    one), and at least ``block``."""
    group = config.hidden_size // config.num_attention_heads
    tokens = max(block, slots // min(next_power_of_two(config.hidden_size), MAX_PER_CT))
    if tokens > slots // group:
        raise UnsupportedModelError(f"{block} tokens of heads of {group} do not fit {slots} slots")
    return Layout(slots, tokens, config.hidden_size, group), Layout(slots, tokens, ffn_width(config), group)


def check_heads(config) -> None:
    """UnsupportedModelError unless the heads are of a power-of-two size that divides the width."""
    group = config.hidden_size // config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or group
    if group & (group - 1) or group * config.num_attention_heads != config.hidden_size or head_dim != group:
        raise UnsupportedModelError(f"protocol 'he' needs heads of a power-of-two size that tile the width, not "
                                    f"{config.num_attention_heads} heads of {head_dim} in {config.hidden_size}")


class LayerProgram:
    """The parts of a transformer's layers on one CKKS context that do not depend on the family:
    the layouts for sequences of ``block`` tokens, linear layers, attention."""

    def __init__(self, ctx: CKKS, config, block: int, bounds: Bounds):
        check_heads(config)
        self.ctx, self.config, self.bounds = ctx, config, bounds
        self.block = next_power_of_two(block)
        slots = ctx.params.slots
        self.layout, self.ff_layout = layouts(slots, config, self.block)
        self.group, tokens = self.layout.group, self.layout.tokens
        t = np.arange(slots) % tokens  # the token of each slot
        self.shift_masks = [((t % self.block) + s < self.block).astype(np.float64) for s in range(self.block)]
        # each slot's feature index in its head
        self.feature = (np.arange(slots) // (self.layout.heads_per_ct * tokens)) % self.group
        self.select = [(self.feature == i).astype(np.float64) for i in range(self.group)]

    def linear(self, weight: np.ndarray, bias: np.ndarray | None, wide_in: bool = False,
               wide_out: bool = False) -> SlotLinear:
        """``y = x weight + bias`` (``weight``: ``[in, out]``) between the hidden layout and, where
        ``wide_*``, the FFN's."""
        lin, lout = (self.ff_layout if wide_in else self.layout), (self.ff_layout if wide_out else self.layout)
        return SlotLinear(self.ctx, np.asarray(weight, dtype=np.float64),
                          None if bias is None else np.asarray(bias, dtype=np.float64), lin, lout)

    @staticmethod
    def steps_needed(ctx: CKKS, config, block: int) -> set[int]:
        """The rotation steps the layers need for sequences of ``block``: token shifts by 1 and
        ``-block``, folds by ``tokens 2^i``, and the products' baby and giant steps."""
        block = next_power_of_two(block)
        lay, ff = layouts(ctx.params.slots, config, block)
        steps = {1, -block} | {lay.tokens << i for i in range(int(math.log2(lay.per_ct)))}
        return steps | set(SlotLinear.steps(lay)) | set(SlotLinear.steps(ff))

    def _linear(self, lin: SlotLinear, cts: list[Ciphertext], refresh) -> list[Ciphertext]:
        """The product at the lowest level that takes it (its rotations cost about the square of
        the primes left; refreshing the outputs costs less)."""
        return lin([op.fit(c, 1, refresh) for c in cts])

    def _norm(self, x: list[Ciphertext], weights: tuple, eps: float, refresh, center: bool = True):
        """LayerNorm (``weights``: gamma and beta slot vectors) or RMSNorm (``center=False``,
        ``weights``: gamma and None) of every token."""
        lay = self.layout
        return op.layer_norm(self.ctx, x, lay.per_ct, lay.tokens, *weights, eps, *self.bounds.variance,
                             refresh=refresh, center=center, size=lay.width)

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
        """Attention of the heads of one ciphertext; ``keep``: :meth:`_keep_masks`. Every input is
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

    def _keep_masks(self, allowed) -> list[np.ndarray]:
        """0/1 per score slot, one vector per score ciphertext: ``allowed(t, key)`` (arrays of the
        slot's token and the token of its key offset, both inside one block) and the offset
        inside the block."""
        lay, g = self.layout, self.group
        slots = np.arange(self.ctx.params.slots)
        t = slots % lay.tokens
        i = (slots // (lay.heads_per_ct * lay.tokens)) % g
        out = []
        for b in range(max(1, self.block // g)):
            d = b * g + i
            key = t - t % self.block + (t % self.block + d) % self.block
            out.append(((d < self.block) & allowed(t, key)).astype(np.float64))
        return out


CALIBRATE_ATTENTION = "hf_secure_he_calibrate"
_RECORD: ContextVar[dict | None] = ContextVar("he_calibration_record", default=None)  # set by calibrate()


def _recording_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention that records the largest ``|score|`` (after scaling, before the mask) in
    the running calibration's record (:data:`_RECORD`); ``attention_mask``: the additive eager mask."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    groups = query.shape[1] // key.shape[1]  # grouped-query attention
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    seen = _RECORD.get()
    if seen is not None:
        seen["scores"] = max(seen["scores"], float(scores.abs().max()))
    if attention_mask is not None:
        scores = scores + attention_mask[..., :key.shape[-2]]
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def register_calibration() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(CALIBRATE_ATTENTION, _recording_attention)
    AttentionMaskInterface.register(CALIBRATE_ATTENTION, eager_mask)


def calibrate(model, spec, input_ids: torch.Tensor, margin: float = 1.5, floor: float = 4.0) -> Bounds:
    """The approximations' ranges for a plaintext transformers model of the family ``spec``,
    measured on ``input_ids``: ``margin`` times the largest score (recorded by an attention
    function registered with transformers' attention interface) and FFN pre-activation (the
    outputs of the family's activation projections), at least ``floor``; the variances (mean
    squares) plus eps of the normalisations the server computes within ``[min / 8, 8 max]``. The
    model owner states them with the model; inputs that leave them get wrong results (the server
    cannot see or check values)."""
    register_calibration()
    seen = {"scores": 0.0, "act": 0.0, "var": [float("inf"), 0.0]}
    layers = model.config.num_hidden_layers
    modules = dict(model.named_modules())
    prefix = "" if spec.name != "bert" or "encoder.layer.0" in modules else "bert."

    def ffn(module, args, output):
        seen["act"] = max(seen["act"], float(output.abs().max()))

    def norm(module, args, output):
        x = args[0].double()
        if isinstance(module, torch.nn.LayerNorm):
            var = x.var(-1, unbiased=False) + module.eps
        else:  # RMSNorm
            var = x.pow(2).mean(-1) + module.variance_epsilon
        seen["var"] = [min(seen["var"][0], float(var.min())), max(seen["var"][1], float(var.max()))]

    hooks = [modules[prefix + name].register_forward_hook(ffn) for _, name in spec.activation_sites(layers)]
    hooks += [modules[prefix + name].register_forward_hook(norm)
              for name, site in spec.norm_sites(layers).items() if site != "embeddings"]  # the client embeds
    previous = model.config._attn_implementation
    model.config._attn_implementation = CALIBRATE_ATTENTION
    token = _RECORD.set(seen)
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        _RECORD.reset(token)
        model.config._attn_implementation = previous
        for h in hooks:
            h.remove()
    if seen["scores"] == 0.0:
        raise UnsupportedModelError("calibration saw no attention scores: the model does not use transformers' "
                                    "attention interface")
    return Bounds(scores=max(floor, margin * seen["scores"]), activation=max(floor, margin * seen["act"]),
                  variance=(seen["var"][0] / 8, seen["var"][1] * 8))
