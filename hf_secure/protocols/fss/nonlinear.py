"""Transformer nonlinearities on masked values: Sigma's protocols (PoPETs 2024, section 4).

Every function takes :class:`~.core.Masked` fixed-point values (``f`` fractional bits on the
ring ``Z_2^n``) and returns :class:`~.core.Shares` with ``f`` fractional bits, which the caller
opens (:meth:`~.core.FSS.reveal`) when the next step needs a masked value. Round counts are for
the servers; the dealer runs the same code on masks.

Ranges are covered or checked, not assumed: comparisons run on every bit the value can occupy
on its ring (no value of the ring is misclassified), inputs beyond a table's domain are clipped
to its edge, a table entry outside the function's useful range holds the function's limit, and
the norms' inputs are checked per query (:mod:`.ranges`). The remaining error sources are the
fixed-point resolution (``2^-f``, the tables' 6-7 bit input grids, whose indexes are cut by
local truncate-reduce: one unit of the grid at most) and exact truncation (``floor``).
"""

from __future__ import annotations

import math

import torch

from ..mpc.ring import encode
from . import ranges
from .core import FSS, Masked, Shares, signed

GELU_CLIP_BITS = 8   # |x| < 4 at 6 fractional bits: 256 entries (Sigma)
SILU_CLIP_BITS = 10  # |x| < 16 at 6 fractional bits: 1024 entries (Sigma)
TABLE_FRAC = 6       # fractional bits of the activation tables' input
EXP_HALF_BITS = 8    # softmax: t = max - x split into two 8-bit halves (Sigma's nExp)
INVERSE_FRAC = 6     # softmax: the row sum enters the inverse table with 6 fractional bits
MANTISSA_BITS = 7    # LayerNorm/RMSNorm: rsqrt table on (exponent, 7-bit mantissa) (Sigma)
EXPONENT_BITS = 6


def _relu_minus(fn, clip_bits: int, frac: int) -> torch.Tensor:
    """Table of ``relu(a) - fn(a)`` at ``a = i / 2^6``, i < 2^clip_bits (an even correction for
    GeLU and SiLU: ``fn(x) = relu(x) - T(|x|)``)."""
    a = torch.arange(1 << clip_bits, dtype=torch.float64) / (1 << TABLE_FRAC)
    return encode(torch.relu(a) - fn(a), frac)


def _gelu(a):
    return 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))


def _silu(a):
    return a * torch.sigmoid(a)


def _gelu_tanh(a):
    return 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))


ACTIVATIONS = {  # transformers' ACT2FN names -> (function, clip bits)
    "gelu": (_gelu, GELU_CLIP_BITS),
    "gelu_new": (_gelu_tanh, GELU_CLIP_BITS),
    "gelu_pytorch_tanh": (_gelu_tanh, GELU_CLIP_BITS),
    "silu": (_silu, SILU_CLIP_BITS),
}


def operand_bits(ctx: FSS, frac: int) -> int:
    """The ring width that holds, signed and with one bit to spare, any value a truncation can
    output correctly, read with ``frac`` fractional bits: a truncation is exact for products below
    ``2^(n-2)`` at ``2f`` fractional bits (:meth:`~.core.FSS.truncate`), i.e. below
    ``2^(n-2-2f)`` in real units, so ``n - 2f + frac`` bits (32 for GeLU's 6-bit grid, 38 at
    ``f`` bits on Sigma's 50-bit ring). Comparisons on a linear layer's output (GeLU/SiLU, the
    softmax's scores, with one more bit for their differences) run on this width, as Sigma's
    (GeLU on 33 bits, the maximum on 40): shorter DPF walks and keys, and no new assumption."""
    return ctx.params.ring_bits - 2 * ctx.params.frac_bits + frac


def activation(ctx: FSS, x: Masked, name: str) -> Shares:
    """``fn(x) = relu(x) - T(clip(|x|))`` for GeLU/SiLU (Sigma, section 4.2): 3 rounds, then the
    caller's opening.

    1. ``y = floor(x / 2^(f-6))`` (local truncate-reduce; ``y`` may be one more) on
       :func:`operand_bits` (32 at ``n = 50``: ``x`` is a linear layer's output), then one DPF
       key at ``y``'s mask gives XOR shares of ``d = [y >= 0]`` and ``c = [|y| < 2^clip]``; both
       bits are opened masked (round 1).
    2. A mux on ``(d, c)`` selects ``y``, ``-y`` or ``2^clip - 1``: the clipped ``|y|`` on the
       ``clip``-bit ring, opened (round 2).
    3. A lookup of ``T`` at it (round 3) and ``relu(x) = d x`` by a mux on ``d``, subtracted.
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"no FSS protocol for the activation {name!r}; known: {sorted(ACTIVATIONS)}")
    fn, clip_bits = ACTIVATIONS[name]
    f = ctx.params.frac_bits
    y = x.shift_down(f - TABLE_FRAC).reduce(operand_bits(ctx, TABLE_FRAC))
    k = y.bits
    edge = (1 << clip_bits) - 1
    # d = [y < 2^(k-1)] (y >= 0); c = [-edge <= y <= edge] = [(y + edge) mod 2^k < 2 edge + 1]
    d, c = ctx.less_than(y, [(0, 1 << (k - 1)), (edge, 2 * edge + 1)])
    d, c = ctx.reveal(d, c)
    # index d + 2c: (d=0,c=0) y < -edge; (1,0) y > edge; (0,1) -y; (1,1) y
    clipped = ctx.mux([d, c], y.reduce(clip_bits), [(0, edge), (0, edge), (-1, 0), (1, 0)], clip_bits)
    (clipped,) = ctx.reveal(clipped)
    table = _relu_minus(fn, clip_bits, f)
    (correction,) = ctx.lookup([(clipped, table)], x.bits)
    relu = ctx.mux([d], x, [(0, 0), (1, 0)], x.bits)
    return relu - correction


def maximum(ctx: FSS, x: Masked, valid: torch.Tensor) -> Masked:
    """Row maximum of ``x`` ``(R, W)`` over its ``valid`` (public bool) entries, by a tournament.

    ``x`` holds a linear layer's outputs (the attention scores), so the DReLU of a difference runs
    on :func:`operand_bits` + 1 bits (39 at ``n = 50``).
    Per level, pairs of valid entries take one DReLU of ``a - b`` (opened masked, round 1) and
    ``b + d (a - b)`` by a mux (opened, round 2); a pair with one invalid side passes the valid
    one on locally (the mask is public, so is the choice), so a causal row costs its own length,
    not the padded width. ``ceil(log2 W)`` levels at most; a level with no pair to compare costs
    no round. Output ``(R, 1)`` (a row with no valid entry: meaningless, never used).
    """
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        a, b = x.apply(lambda t: t[:, :half].contiguous()), x.apply(lambda t: t[:, half:2 * half].contiguous())
        va, vb = valid[:, :half], valid[:, half:2 * half]
        best = a.where(va | ~vb, b)
        pairs = (va & vb).reshape(-1).nonzero().squeeze(1)
        if pairs.numel():
            a_sel, b_sel = (v.apply(lambda t: t.reshape(-1)[pairs]) for v in (a, b))
            diff = a_sel - b_sel
            (d,) = ctx.reveal(ctx.sign_bit(diff.reduce(operand_bits(ctx, ctx.params.frac_bits) + 1)))
            (winner,) = ctx.reveal(ctx.mux([d], diff, [(0, 0), (1, 0)], x.bits) + b_sel)
            best = best.put(pairs, winner)
        merged = va | vb
        if x.shape[-1] % 2:
            best = _cat(ctx, [best, x.apply(lambda t: t[:, 2 * half:].contiguous())])
            merged = torch.cat([merged, valid[:, 2 * half:]], dim=-1)
        x, valid = best, merged
    return x


def _cat(ctx: FSS, parts: list[Masked]) -> Masked:
    shares = None if any(p.share is None for p in parts) else torch.cat([p.share for p in parts], dim=-1)
    return Masked(ctx, torch.cat([p.data for p in parts], dim=-1), parts[0].bits, shares)


def _exp_tables(f: int):
    """nExp halves: ``e^(-256 h / 2^12)`` for the high byte ``h`` and ``e^(-v / 2^12)`` for the
    signed low part ``v`` in ``(-256, 256)`` (9-bit ring), both at ``f`` fractional bits."""
    h = torch.arange(1 << EXP_HALF_BITS, dtype=torch.float64)
    high = encode(torch.exp(-h * (1 << EXP_HALF_BITS) / (1 << 12)), f)
    v = signed(torch.arange(1 << (EXP_HALF_BITS + 1)), EXP_HALF_BITS + 1).double()
    low = encode(torch.exp(-v / (1 << 12)), f)
    return high, low


def _inverse_table(length: int, f: int):
    bits = max(length - 1, 1).bit_length() + INVERSE_FRAC + 1
    i = torch.arange(1 << bits, dtype=torch.float64).clamp(min=1 << INVERSE_FRAC)  # a row sum is >= 1
    return bits, encode((1 << INVERSE_FRAC) / i, f)  # the index rounds stochastically: i is the centre


def softmax(ctx: FSS, x: Masked, keep: torch.Tensor | None = None) -> Masked:
    """Softmax over the last dimension of ``x`` with a public bool mask ``keep`` (causal, padding;
    broadcast to ``x``): dropped positions get weight exactly 0 and cost nothing
    (:func:`softmax_kept` on the kept entries only)."""
    keep = torch.ones(x.shape, dtype=torch.bool) if keep is None else keep.expand(x.shape).bool()
    rows = keep.reshape(-1, x.shape[-1])
    index = rows.reshape(-1).nonzero().squeeze(1)
    p = softmax_kept(ctx, x.apply(lambda t: t.reshape(-1)[index]), rows)
    return Masked.zeros(ctx, x.shape, x.bits).put(index, p)


def softmax_kept(ctx: FSS, s: Masked, keep: torch.Tensor) -> Masked:
    """Softmax of the rows of a public pattern ``keep`` ``(R, W)`` whose kept entries, in row-major
    order, are ``s`` ``(K,)`` (Sigma, section 4.3; causal models compute the lower triangle only).

    ``t = max - s >= 0`` per row (:func:`maximum`), clipped below ``2^16 - 2^8`` (``t < 16``,
    where ``e^-t < 2^-12``); ``e^-t`` is the product of two lookups on the high byte and on the
    signed low part (the masked low byte read on 9 bits, which absorbs the high byte's carry
    exactly), multiplied in the lookups' round (:meth:`~.core.FSS.lookup_product`). The row sum
    (``>= 1``) enters a lookup of its inverse with 6 fractional bits
    (``2^(ceil(log2 W) + 7)`` entries), and ``p = e / sum``. Rounds: ``2 ceil(log2 W)`` for the
    maximum at most, then 9. Returns ``p`` ``(K,)``.
    """
    n, f = s.bits, ctx.params.frac_bits
    rows, width = keep.shape
    row_of = keep.nonzero()[:, 0]
    laid = Masked.zeros(ctx, (rows * width,), n).put(keep.reshape(-1).nonzero().squeeze(1), s)
    top = maximum(ctx, laid.apply(lambda t: t.view(rows, width)), keep)
    t = top.apply(lambda v: v.reshape(-1)[row_of]) - s
    width_t = 2 * EXP_HALF_BITS
    limit = (1 << width_t) - (1 << EXP_HALF_BITS) - 1
    (inside,) = ctx.reveal(*ctx.less_than(t.reduce(operand_bits(ctx, f) + 1), [(0, limit)]))
    (clipped,) = ctx.reveal(ctx.mux([inside], t.reduce(width_t), [(0, limit), (1, 0)], width_t))
    high = clipped.shift_down(EXP_HALF_BITS)
    low = Masked(ctx, clipped.data & ((1 << EXP_HALF_BITS) - 1), EXP_HALF_BITS + 1)
    high_table, low_table = _exp_tables(f)
    (e,) = ctx.reveal(ctx.lookup_product((high, high_table), (low, low_table), n))  # 2f fractional bits
    total = e.segment_sum(row_of, rows)
    bits, inverse_table = _inverse_table(width, f)
    index = total.shift_down(2 * f - INVERSE_FRAC).reduce(bits)
    (inverse,) = ctx.lookup([(index, inverse_table)], n)
    (inverse,) = ctx.reveal(inverse)
    (p,) = ctx.reveal(ctx.product(e, inverse.apply(lambda v: v[row_of])))  # 3f fractional bits
    (p,) = ctx.reveal(ctx.truncate(p, 2 * f))
    return p


def _rsqrt_table(f: int, dim: int, eps: float):
    """rsqrt on a float-like index ``e * 2^7 + m``: the statistic ``s = sum x^2`` (``f``
    fractional bits) is ``~ 2^e (1 + m / 2^7)``; the entry is ``1 / sqrt(s / dim + eps)`` at
    ``2f`` fractional bits (a row of large variance has a small scale, which ``f`` bits would
    hold to a few significant bits). ``e = 0`` stands for every ``s < 2`` (``sum x^2 < 2^(1-f)``): it
    holds the value at ``s = 1``, which bounds the scale of a (nearly) constant row."""
    index = torch.arange(1 << (EXPONENT_BITS + MANTISSA_BITS))
    e, m = (index >> MANTISSA_BITS).double(), (index & ((1 << MANTISSA_BITS) - 1)).double()
    s = torch.pow(2.0, e) * (1 + (m + 0.5) / (1 << MANTISSA_BITS)) / (1 << f)
    # e = 0 (s < 2) holds the value at s = 1; s = 0 lands at index -2^7 (e = 63, unreachable by
    # any other s since exponents stop at n - 6), which holds the same
    s = torch.where((e == 0) | (e == (1 << EXPONENT_BITS) - 1), torch.ones_like(s) / (1 << f), s)
    return encode(1 / torch.sqrt(s / dim + eps), 2 * f)


def normalize(ctx: FSS, x: Masked, weight: Masked, bias: Masked | None, eps: float, centered: bool) -> Shares:
    """LayerNorm (``centered``) or RMSNorm over the last dimension (Sigma, section 4.4).

    The input's range (``|x| < 4096``) is checked per element and the row's sum of squares
    (``< 2^24``) per row (:mod:`.ranges`: refused, not garbage). The mean uses a 24-bit
    reciprocal of the width (one rounded truncation, opened: 2 rounds). The sum of squares ``s``
    (opened, truncated to ``f`` fractional bits and opened: 3 rounds) is located between powers
    of two by one DPF key evaluated at every ``2^i``; the one-hot exponent is opened masked (1
    round) and a mux per exponent assembles the float-like index ``e 2^7 + m`` (opened: 1
    round), looked up in the rsqrt table (1 round). Then ``(x - mean) * rsqrt`` and ``* weight``
    (+ ``bias``), two products each truncated: 5 rounds, then the caller's opening.
    """
    n, f = x.bits, ctx.params.frac_bits
    dim = x.shape[-1]
    ranges.check_norm_input(ctx, x)
    if centered:
        inverse_dim = round((1 << 24) / dim)
        total = x.apply(lambda v: v.sum(dim=-1, keepdim=True)).mul_public(inverse_dim)
        (mean,) = ctx.reveal(ctx.truncate(total.add_public(1 << 23), 24))  # rounded: a constant row centres to 0
        x = x - mean.apply(lambda v: v.expand(x.shape).contiguous())
    (squares,) = ctx.reveal(ctx.product(x, x).apply(lambda v: v.sum(dim=-1, keepdim=True)))
    (s,) = ctx.reveal(ctx.truncate(squares, f))  # f fractional bits: exponents up to n - 6 keep 13-bit leads
    index_bits = EXPONENT_BITS + MANTISSA_BITS
    top = min(n - index_bits + MANTISSA_BITS, (1 << EXPONENT_BITS) - 1)
    below = ctx.less_than(s, [(0, 1 << i) for i in range(1, top + 1)])  # [s < 2^i], i = 1..top
    ranges.check_below(ctx, "norm sum of squares", below[n - 2 - f - 1])  # [s < 2^(n-2-f)]: the truncation's bound
    onehot = [below[0]] + [below[i] - below[i - 1] for i in range(1, top)]  # XOR: [2^i <= s < 2^(i+1)]
    onehot = ctx.reveal(*onehot)
    index = None
    for i, bit in enumerate(onehot):
        if i > MANTISSA_BITS:
            lead = s.shift_down(i - MANTISSA_BITS).reduce(index_bits)
        else:
            lead = s.reduce(index_bits).mul_public(1 << (MANTISSA_BITS - i))  # exact for s < 2^(i+1)
        term = ctx.mux([bit], lead, [(0, 0), (1, (i << MANTISSA_BITS) - (1 << MANTISSA_BITS))], index_bits)
        index = term if index is None else index + term
    (index,) = ctx.reveal(index)
    (scale,) = ctx.lookup([(index, _rsqrt_table(f, dim, eps))], n)
    (scale,) = ctx.reveal(scale)
    (y,) = ctx.reveal(ctx.product(x, scale.apply(lambda v: v.expand(x.shape).contiguous())))  # 3f bits
    (y,) = ctx.reveal(ctx.truncate(y, 2 * f))
    (y,) = ctx.reveal(ctx.product(y, weight.apply(lambda v: v.expand(y.shape).contiguous())))
    out = ctx.truncate(y, f)
    if bias is not None:
        out = out + bias.apply(lambda v: v.expand(y.shape).contiguous())
    return out
