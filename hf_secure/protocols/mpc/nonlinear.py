"""SecFormer's and MPCFormer's nonlinear building blocks on shared values.

* :func:`sine_series` -- ``sum_k b_k sin(2 pi k x / P)`` in one round. The dealer shares a mask
  ``t`` (uniform on [0, 2^62) in fixed-point units) with ``sin(w k t)`` and ``cos(w k t)``; the servers
  open ``d = x - t`` and use ``sin(w k x) = sin(w k d) cos(w k t) + cos(w k d) sin(w k t)``. The sines
  of ``d`` are computed in the clear after reducing ``d`` modulo the series period ``P`` (exactly,
  in integers): the period of the series, not 2 pi. ``d`` hides ``x`` statistically: for
  ``|x| < 2^l`` (fixed-point units) its distribution is within ``2^(l - 62)`` of independent of ``x``.
* :func:`erf_series` -- SecFormer's Fourier approximation of erf on [-2.5, 2.5] (period 20).
* :func:`gelu`, :func:`silu` -- ``0.5 x (1 + g)`` with ``g`` odd and saturating: ``erf(x / sqrt 2)``
  for GeLU, ``tanh(x / 2)`` for SiLU (``x sigmoid(x)``). ``g`` is a sine series on ``[-c, c]`` and
  -1 / +1 outside, chosen by two comparisons (SecFormer's segmentation).
* :func:`inv_sqrt` -- Goldschmidt: ``x0 = v / s`` (input deflation by a public bound ``s`` so that
  ``x0`` lies in (0, 3)), ``y0 = 1``; repeat ``m = (3 - x) / 2; x <- x m^2; y <- y m``; then
  ``y -> 1 / sqrt(x0)`` and ``1 / sqrt(v) = y / sqrt(s)``.
* :func:`reciprocal` -- Goldschmidt division: ``x0 = v / s`` in (0, 2), ``y0 = 1``;
  ``m = 2 - x; x <- x m; y <- y m``; ``y -> 1 / x0``.
* :func:`layer_norm`, :func:`rms_norm` -- statistics by local sums and one square, then
  :func:`inv_sqrt`.
* :func:`quad_gelu` (MPCFormer: ``0.125 x^2 + 0.25 x + 0.5``) and :func:`two_quad_softmax`
  (``(s + c)^2`` masked, normalised by its row sum with :func:`reciprocal`).
"""

from __future__ import annotations

import math

import torch

from .comparison import drelu, maximum
from .core import MPC, Shared
from .prg import PRG
from .ring import encode

# SecFormer's coefficients: erf(u) ~ sum_k b_k sin(k pi u / 10) on [-2.5, 2.5] (period 20 in u).
ERF_SINE_COEFFS = (1.25772, -0.0299154, 0.382155, -0.0519123, 0.196033, -0.0624557, 0.118029)
ERF_PERIOD = 20
# tanh(x / 2) ~ sum_k b_k sin(2 pi k x / 22) on [-8, 8] (least squares, max error 6e-4; SiLU error
# 2.7e-3 including the jump at |x| = 8). Small coefficients: fixed-point errors are not amplified.
TANH_HALF_SINE_COEFFS = (1.165308, -0.066778, 0.213696, -0.03896, 0.046832, -0.008945, 0.006753)
TANH_HALF_PERIOD = 22
SILU_CUT = 8.0
ERF_CUT = 2.5
_MASK_BITS = 62
_CHUNK = 1 << 15  # elements per chunk of the sine series' local sum
# Narrow comparisons (bits, dropped low bits): the segment tests of GeLU and SiLU keep 4 fractional
# bits and need |u| < 2^10 (15-bit lanes: four per word, four carry levels); the max of attention
# scores keeps 8 fractional bits and needs |difference| < 2^11.
SEGMENT_COMPARISON = (15, 12)
MAX_COMPARISON = (20, 8)


def sine_series(x: Shared, coeffs, period: int) -> Shared:
    """``sum_k coeffs[k-1] * sin(2 pi k x / period)`` for an integer ``period``; one round."""
    mpc: MPC = x.mpc
    modulus = period * mpc.scale  # the period in fixed-point units, exact
    n = len(coeffs)
    mpc.next_request()
    shapes = [x.shape, (2, n, *x.shape)]
    secrets = None
    if mpc.is_dealer:
        t = PRG.fresh().ring(x.shape) & ((1 << _MASK_BITS) - 1)
        secrets = [t, encode(_harmonics(t, modulus, n).flip(0), mpc.frac_bits)]  # cos(kwt), sin(kwt)
    t_share, trig_t = mpc.dealt(secrets, shapes)
    if mpc.offline:
        return mpc.placeholder(x.shape)
    d = mpc.open(x - mpc.shared(t_share)).reshape(-1)
    trig_t = trig_t.reshape(2, n, -1)
    # sum_k b_k (sin(kwd) [cos kwt] + cos(kwd) [sin kwt]): public times shared, local. The public
    # factors are encoded by truncation instead of rounding (error < 1 unit). In chunks that stay
    # in cache: the 2n terms per element would otherwise stream through memory several times.
    b = torch.tensor(coeffs, dtype=torch.float64).view(1, n, 1) * mpc.scale
    total = torch.empty_like(d)
    for i in range(0, d.numel(), _CHUNK):
        part = slice(i, i + _CHUNK)
        total[part] = (trig_t[:, :, part] * (_harmonics(d[part], modulus, n) * b).long()).sum((0, 1))
    return mpc.shared(total.view(x.shape)).truncate()


def _harmonics(v: torch.Tensor, modulus: int, n: int) -> torch.Tensor:
    """``[sin(k w v), cos(k w v)]`` for k = 1..n, shape ``(2, n, *v.shape)``, ``w = 2 pi / modulus``.

    ``v`` (fixed-point int64) is reduced modulo the period exactly, in integers; higher harmonics
    come from the angle addition formulas (two transcendental evaluations instead of 2n).
    """
    angle = torch.remainder(v, modulus).double() * (2 * math.pi / modulus)
    out = torch.empty((2, n, *v.shape), dtype=torch.float64)
    sines, cosines = out[0], out[1]
    torch.sin(angle, out=sines[0])
    torch.cos(angle, out=cosines[0])
    for k in range(1, n):
        torch.sub(cosines[k - 1] * cosines[0], sines[k - 1] * sines[0], out=cosines[k])
        torch.add(sines[k - 1] * cosines[0], cosines[k - 1] * sines[0], out=sines[k])
    return out


def erf_series(u: Shared) -> Shared:
    """SecFormer's erf on [-2.5, 2.5] (max error ~0.036 there; outside it needs the segment selection)."""
    return sine_series(u, ERF_SINE_COEFFS, ERF_PERIOD)


def inv_sqrt(v: Shared, bound: float, iterations: int = 8) -> Shared:
    """1/sqrt(v) for 0 < v <= 2 * bound (``bound``: the public deflation constant).

    The iteration converges on (0, 3) after deflation but stalls near 3 (m ~ 0 there); on
    [0.01, 2] eight iterations reach fixed-point precision.
    """
    x = v.mul_public(1.0 / bound)
    y = None
    for _ in range(iterations):
        m = (-x).add_public(3.0).mul_public(0.5)
        if y is None:
            y = m
            x = x * m.square()
        else:
            m2, y = v.mpc.products([(m, m), (y, m)])
            x = x * m2
    return y.mul_public(1.0 / math.sqrt(bound))


def reciprocal(v: Shared, bound: float, iterations: int = 10) -> Shared:
    """1/v for 0 < v < 2 * bound."""
    x = v.mul_public(1.0 / bound)
    y = None
    for _ in range(iterations):
        m = (-x).add_public(2.0)
        if y is None:
            x, y = x * m, m
        else:
            x, y = v.mpc.products([(x, m), (y, m)])
    return y.mul_public(1.0 / bound)


def layer_norm(x: Shared, weight: Shared, bias: Shared, eps: float, var_bound: float,
               iterations: int = 8) -> Shared:
    """LayerNorm over the last dimension; ``var_bound``: public deflation bound of the variance.

    Rounds: ``(x - mean)^2`` and ``(x - mean) * gamma`` together, the inverse square root, then one
    product with it.
    """
    n = x.shape[-1]
    centered = x - x.sum(-1, keepdim=True).mul_public(1.0 / n)
    squared, scaled = x.mpc.products([(centered, centered), (centered, _broadcast(weight, x.shape))])
    var = squared.sum(-1, keepdim=True).mul_public(1.0 / n).add_public(eps)
    return scaled * _broadcast(inv_sqrt(var, var_bound, iterations), x.shape) + bias


def rms_norm(x: Shared, weight: Shared, eps: float, ms_bound: float, iterations: int = 8) -> Shared:
    """RMSNorm (Llama) over the last dimension; ``ms_bound``: public deflation bound of the mean square.

    Rounds as in :func:`layer_norm`: ``x^2`` and ``x * gamma`` together, the inverse square root, one product.
    """
    n = x.shape[-1]
    squared, scaled = x.mpc.products([(x, x), (x, _broadcast(weight, x.shape))])
    ms = squared.sum(-1, keepdim=True).mul_public(1.0 / n).add_public(eps)
    return scaled * _broadcast(inv_sqrt(ms, ms_bound, iterations), x.shape)


def _broadcast(v: Shared, shape) -> Shared:
    return v.mpc.shared(v.share.expand(shape).contiguous())


def quad_gelu(x: Shared) -> Shared:
    """MPCFormer's GeLU replacement ``0.125 x^2 + 0.25 x + 0.5`` (for distilled models)."""
    return x.square().mul_public(0.125) + x.mul_public(0.25).add_public(0.5)


def two_quad_softmax(scores: Shared, mask: torch.Tensor, c: float = 5.0, sum_bound: float = 1.0) -> Shared:
    """MPCFormer's 2Quad: ``(s + c)^2 * mask / sum``; ``mask`` is public 0/1, broadcastable to scores."""
    q = scores.add_public(c).square().mul_public(mask.to(torch.int64))
    total = q.sum(-1, keepdim=True)
    return q * _broadcast(reciprocal(total, sum_bound), q.shape)


def _odd_saturating(x: Shared, u: Shared, series: Shared, cut: float) -> Shared:
    """``0.5 x (1 + g)`` with ``g`` = -1 / ``series`` / +1 for ``u < -cut`` / between / ``u >= cut``."""
    bounds = x.mpc.shared(torch.stack([u.add_public(cut).share, u.add_public(-cut).share]))
    above = drelu(bounds, *SEGMENT_COMPARISON)  # [u >= -cut, u >= cut]
    # 1 + g = above0 (series + 1) - above1 (series - 1): one multiplexer round on the series
    scaled, bits = above.times(series), above.arithmetic()
    return (x * (scaled[0] - scaled[1] + bits[0] + bits[1])).mul_public(0.5)


def gelu(x: Shared) -> Shared:
    """SecFormer's GeLU: ``0.5 x (1 + erf(x / sqrt 2))`` with the segmented sine-series erf."""
    u = x.mul_public(1 / math.sqrt(2))
    return _odd_saturating(x, u, erf_series(u), ERF_CUT)


def silu(x: Shared) -> Shared:
    """SiLU ``x sigmoid(x) = 0.5 x (1 + tanh(x / 2))`` with a segmented sine series for tanh (Llama)."""
    return _odd_saturating(x, x, sine_series(x, TANH_HALF_SINE_COEFFS, TANH_HALF_PERIOD), SILU_CUT)


def exp_negative(t: Shared, squarings: int = 8) -> Shared:
    """``exp(t)`` for ``-2^squarings <= t <= 0`` as ``(1 + t / 2^n)^(2^n)`` (CrypTen's limit form)."""
    y = t.mul_public(1.0 / (1 << squarings)).add_public(1.0)
    for _ in range(squarings):
        y = y.square()
    return y


def softmax(scores: Shared, mask: torch.Tensor) -> Shared:
    """Exact-style softmax over the last dim: max by comparisons, exp, Goldschmidt division.

    ``mask`` is public 0/1 (causal and padding), broadcastable to ``scores``; masked entries are
    excluded from the max (pushed down by a public offset) and zeroed after the exponential.
    """
    n = scores.shape[-1]
    offset = (1 - mask.to(torch.float64)) * -64.0
    lowered = scores.add_public(offset)
    t = lowered - _broadcast(maximum(lowered, -1, *MAX_COMPARISON), lowered.shape)
    e = exp_negative(t).mul_public(mask.to(torch.int64))
    total = e.sum(-1, keepdim=True)
    return e * _broadcast(reciprocal(total, bound=float(n), iterations=int(math.log2(n)) + 6), e.shape)

