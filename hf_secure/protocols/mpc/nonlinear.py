"""SecFormer's and MPCFormer's nonlinear building blocks on shared values.

* :func:`sine_series` -- ``sum_k b_k sin(2 pi k x / P)`` in one round, with perfect masking. The
  input is first scaled to a power-of-two period, ``x' = x 2^p / P`` (``2^p >= P``; a public
  product), so that the period in fixed-point units, ``M = 2^(p + f)``, divides the ring's
  ``2^64``. The dealer shares a mask ``t`` uniform on ``[0, M)`` with ``sin(w k t)`` and
  ``cos(w k t)``, ``w = 2 pi / M``; each server reduces its share of ``x' - t`` modulo ``M`` and the
  servers open ``d = (x' - t) mod M``, which is uniform on ``[0, M)`` whatever ``x`` is: the
  opening reveals nothing. Then ``sin(w k x') = sin(w k d) cos(w k t) + cos(w k d) sin(w k t)``,
  public times shared. (SecFormer masks with ``t`` uniform on a wide interval instead, which hides
  ``x`` only statistically, within ``|x| 2^(f - 62)`` per element.)
* :func:`erf_series` -- SecFormer's Fourier approximation of erf on [-2.5, 2.5] (period 20).
* :func:`gelu`, :func:`silu` -- ``0.5 x (1 + g)`` with ``g`` odd and saturating: ``erf(x / sqrt 2)``
  for GeLU, ``tanh(x / 2)`` for SiLU (``x sigmoid(x)``). ``g`` is a sine series on ``[-c, c]`` and
  -1 / +1 outside, chosen by two comparisons (SecFormer's segmentation). Both read ``x`` itself:
  GeLU's series in ``u = x / sqrt 2`` is a series in ``x`` of period ``20 sqrt 2``, and its
  segment edges ``u = -+2.5`` are ``x = -+2.5 sqrt 2``, so no product makes ``u``.
* :func:`inv_sqrt`, :func:`reciprocal` -- Goldschmidt iterations after input deflation by a
  public bound ``s``: ``x0 = v / s``, then ``m = a_k - b_k x; x <- x m^p; y <- y m`` (``p = 2``
  for the inverse square root, 1 for the reciprocal) until ``x -> 1``, so that
  ``y -> x0^(-1/p)``. SecFormer uses Newton's fixed ``m = (3 - x) / 2`` (resp. ``2 - x``), which
  converges slowly from small ``x0``; we pick each step's line for the public interval that ``x``
  is known to lie in (:func:`_goldschmidt_steps`), which covers ``x0`` in [1e-4, 2] in 9 steps
  instead of about 15. The last step needs only ``y``. Deflation is by a power of two.
* :func:`layer_norm`, :func:`rms_norm` -- statistics by local sums and one square, then
  :func:`inv_sqrt`.
* :func:`quad_gelu` (MPCFormer: ``0.125 x^2 + 0.25 x + 0.5``) and :func:`two_quad_softmax`
  (``(s + c)^2`` masked, normalised by its row sum with :func:`reciprocal`).
"""

from __future__ import annotations

import math

import torch

from .comparison import drelu, maximum
from .core import MPC, SERVER0, Shared
from .prg import PRG
from .ranges import FINE, expect_within
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
_CHUNK = 1 << 15  # elements per chunk of the sine series' local sum
# Narrow comparisons (bits, dropped low bits): 15-bit lanes (four per word, four carry levels) that
# keep 4 fractional bits and need |value| < 2^10. The segment tests of GeLU and SiLU compare x -+ cut;
# the max of attention scores compares score differences (a max that is off by 2^-3 only shifts
# the exponentials' common factor: the softmax is unchanged).
SEGMENT_COMPARISON = (15, 12)
MAX_COMPARISON = (15, 12)
# The variable the activations' segments are stated in, u = U_SCALE * x (erf(u) with u = x / sqrt 2;
# tanh(x / 2) in x itself); proven bounds are recorded on |u| (approximations.activation_input_bound).
U_SCALE = {"secformer_gelu": 1 / math.sqrt(2), "series_silu": 1.0}
# Range limits checked per query (:mod:`.ranges`): the segment tests' lanes (|x -+ cut| < 2^10) and
# the exponential's limit form ((1 + t/256)^256 needs t > -256; a max exact to 2^-3 leaves t <= 1/8).
SEGMENT_LIMIT = 1000.0
EXP_LIMIT, MAX_ABOVE = 240.0, 4.0


def sine_series(x: Shared, coeffs, period: float) -> Shared:
    """``sum_k coeffs[k-1] * sin(2 pi k x / period)`` for a real ``period > 1``; one round, and the
    opened value is uniform (see the module docstring), for any ``x``.

    For a period that is not a power of two, ``x`` is scaled by the public ``2^p / period`` first:
    the scaled value errs by ``|x| 2^-(f+1)`` (the constant's rounding) plus one unit ``2^-f`` (the
    truncation), which shifts the k-th harmonic's angle by at most
    ``2 pi k (|x| 2^-(f+1) + 2^-f) / 2^p``: 1.3e-4 for period 20, ``|x| <= 10``, k = 7 (measured
    1.2e-4; the series then errs by 8e-5, and on erf's segment ``|u| <= 2.5`` by 2e-5).
    """
    mpc: MPC = x.mpc
    power = math.ceil(math.log2(period))  # 2^power >= period
    if period != 1 << power:
        x = x.mul_public((1 << power) / period)  # the series in x' has period 2^power
    modulus = (1 << power) * mpc.scale  # the period in fixed-point units: a power of two
    n = len(coeffs)
    d, trig_t = masked_phase(x, modulus, n)
    if mpc.offline:
        summed = mpc.placeholder(x.shape)
    else:
        summed = mpc.shared(_series_share(d.reshape(-1), trig_t.reshape(2, n, -1), coeffs, modulus, mpc.scale)
                            .view(x.shape))
    return summed.truncate()  # offline too: the truncation draws dealer material


def _series_share(d: torch.Tensor, trig_t: torch.Tensor, coeffs, modulus: int, scale: int) -> torch.Tensor:
    """This server's share of ``sum_k b_k (sin(kwd) [cos kwt] + cos(kwd) [sin kwt])`` (2f fractional
    bits): public times shared, local. The public factors are encoded by truncation instead of
    rounding (error < 1 unit). In chunks that stay in cache: the 2n terms per element would
    otherwise stream through memory several times."""
    n = len(coeffs)
    b = torch.tensor(coeffs, dtype=torch.float64).view(1, n, 1) * scale
    total = torch.empty_like(d)
    for i in range(0, d.numel(), _CHUNK):
        part = slice(i, i + _CHUNK)
        total[part] = (trig_t[:, :, part] * (_harmonics(d[part], modulus, n) * b).long()).sum((0, 1))
    return total


def masked_phase(x: Shared, modulus: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sine protocol's one round: ``d = (x - t) mod modulus``, opened, and the shares of
    ``[cos(k w t), sin(k w t)]`` for k = 1..n (shape ``(2, n, *x.shape)``, ``w = 2 pi / modulus``),
    with ``t`` uniform on ``[0, modulus)`` from the dealer. ``modulus`` is a power of two, so ``d``
    is uniform on ``[0, modulus)`` and independent of ``x``: what the servers see reveals nothing."""
    mpc: MPC = x.mpc
    mpc.next_request()
    secrets = None
    if mpc.is_dealer:
        t = PRG.fresh().ring(x.shape) & (modulus - 1)
        secrets = [t, encode(_harmonics(t, modulus, n).flip(0), mpc.frac_bits)]  # cos(kwt), sin(kwt)
    t_share, trig_t = mpc.dealt(secrets, [x.shape, (2, n, *x.shape)])
    if mpc.offline:
        return t_share, trig_t
    return mpc.open_modulo(x - mpc.shared(t_share), modulus), trig_t


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


def erf_series(x: Shared, scale: float = 1.0) -> Shared:
    """SecFormer's erf of ``u = scale * x`` on ``|u| <= 2.5`` (max error ~0.036 there; outside it needs
    the segment selection): a series in ``x`` of period ``20 / scale``, so ``u`` is never computed."""
    return sine_series(x, ERF_SINE_COEFFS, ERF_PERIOD / scale)


INV_SQRT_RANGE = (1e-4, 2.0)  # inputs of inv_sqrt relative to the bound: 2 allows 1.5x the calibrated maximum
# What a query may bring (checked, :mod:`.ranges`): the steps' headroom keeps inputs up to 2.5x the
# bound accurate (tests/test_mpc_nonlinear.py), and the low end allows for the fixed point's rounding.
INV_SQRT_CHECKED = (0.9e-4, 2.5)
_HEADROOM = 0.25  # each Goldschmidt line keeps m >= _HEADROOM * a on its interval


def _goldschmidt_steps(lo: float, hi: float, power: int, tol: float = 2e-4) -> list[tuple[float, float]]:
    """Coefficients ``(a, b)`` of Goldschmidt steps ``m = a - b x; x <- x m^power`` taking every
    ``x`` in the public interval ``[lo, hi]`` to within ``tol`` of 1.

    Each step chooses the line for the current interval: ``g(x) = x (1 - r x)^power`` with ``r``
    such that ``g(lo) = g(hi)`` (the ends balanced; the maximum is inside), but with ``1 - r hi``
    at least :data:`_HEADROOM`: near the line's root an error in ``x`` would be amplified, and an
    ``x`` somewhat above ``hi`` must still give a positive ``m``. The line is then scaled so that
    the image's ends are reciprocal around 1; the image is the next interval. Public: the servers
    and the dealer compute the same steps.
    """
    steps = []
    while max(1 - lo, hi - 1) > tol:
        if power == 1:
            r = 1 / (lo + hi)
        else:
            r = (math.sqrt(hi) - math.sqrt(lo)) / (hi**1.5 - lo**1.5)
        r = min(r, (1 - _HEADROOM) / hi)
        peak = 1 / ((power + 1) * r)  # where x (1 - r x)^power is largest
        values = [x * (1 - r * x) ** power for x in (lo, hi, min(max(peak, lo), hi))]
        low, high = min(values), max(values)
        c = (low * high) ** (-1 / (2 * power))
        steps.append((c, c * r))
        lo, hi = c**power * low, c**power * high
    return steps


def _times_pow2(x: Shared, k: int) -> Shared:
    """``x * 2^-k`` (a truncation; for ``k < 0`` an exact integer product)."""
    return x.truncate(k) if k > 0 else x.mul_public(torch.tensor(1 << -k)) if k < 0 else x


def _goldschmidt(v: Shared, k: int, steps: list[tuple[float, float]], power: int) -> Shared:
    """``y = prod_j m_j ~ x0^(-1/power)`` for ``x0 = v 2^-k`` over the steps (:func:`_goldschmidt_steps`).

    Deflation by a power of two is exact, and the first step reads ``v`` itself
    (``m = a - (b v) 2^-k``, ``x1 = (v m^power) 2^-k``), so a small ``x0`` keeps its precision.
    Rounds: ``power`` for the first step, then ``power`` per step (``m^2`` with ``y m``, then
    ``x m^2``; ``x m`` with ``y m`` for power 1), and one for the last (``y m`` only).
    """
    x, y = v, None
    for j, (a, b) in enumerate(steps):
        m = (_times_pow2(x.mul_public(-b), k) if y is None else x.mul_public(-b)).add_public(a)
        if j == len(steps) - 1:
            return m if y is None else y * m
        if y is None:
            y = m
            x = _times_pow2(x * m.square() if power == 2 else x * m, k)
        elif power == 2:
            m2, y = x.mpc.products([(m, m), (y, m)])
            x = x * m2
        else:
            x, y = x.mpc.products([(x, m), (y, m)])
    return y


def inv_sqrt(v: Shared, bound: float) -> Shared:
    """1/sqrt(v) for ``v / bound`` in :data:`INV_SQRT_RANGE` (``bound``: the public deflation constant).

    Deflation by ``2^k >= bound`` (``k`` even, so that ``2^(-k/2)`` rescales exactly). The range is
    checked at the end of the query (:mod:`.ranges`).
    """
    expect_within(v, INV_SQRT_CHECKED[0] * bound, INV_SQRT_CHECKED[1] * bound, "LayerNorm/RMSNorm statistic")
    k = math.ceil(math.log2(bound))
    k += k % 2
    lo, hi = (r * bound / 2**k for r in INV_SQRT_RANGE)
    return _times_pow2(_goldschmidt(v, k, _goldschmidt_steps(lo, hi, power=2), 2), k // 2)


def _inverse(v: Shared, low: float, high: float) -> tuple[Shared, int]:
    """``(y, k)`` with ``y 2^-k ~ 1/v`` for ``v`` in the public interval ``[low, high]``
    (deflation by ``2^k >= high``). Multiply by ``y`` first and rescale after, to keep precision."""
    k = math.ceil(math.log2(high))
    return _goldschmidt(v, k, _goldschmidt_steps(low / 2**k, high / 2**k, power=1), 1), k


def reciprocal(v: Shared, low: float, high: float) -> Shared:
    """1/v for ``v`` in the public interval ``[low, high]``."""
    y, k = _inverse(v, low, high)
    return _times_pow2(y, k)


def layer_norm(x: Shared, weight: Shared, bias: Shared, eps: float, var_bound: float) -> Shared:
    """LayerNorm over the last dimension; ``var_bound``: public deflation bound of the variance.

    Rounds: ``(x - mean)^2`` and ``(x - mean) * gamma`` together, the inverse square root, then one
    product with it.
    """
    n = x.shape[-1]
    centered = x - x.sum(-1, keepdim=True).mul_public(1.0 / n)
    squared, scaled = x.mpc.products([(centered, centered), (centered, weight)])
    var = squared.sum(-1, keepdim=True).mul_public(1.0 / n).add_public(eps)
    return scaled * inv_sqrt(var, var_bound) + bias


def rms_norm(x: Shared, weight: Shared, eps: float, ms_bound: float) -> Shared:
    """RMSNorm (Llama) over the last dimension; ``ms_bound``: public deflation bound of the mean square.

    Rounds as in :func:`layer_norm`: ``x^2`` and ``x * gamma`` together, the inverse square root, one product.
    """
    n = x.shape[-1]
    squared, scaled = x.mpc.products([(x, x), (x, weight)])
    ms = squared.sum(-1, keepdim=True).mul_public(1.0 / n).add_public(eps)
    return scaled * inv_sqrt(ms, ms_bound)


def quad_gelu(x: Shared) -> Shared:
    """MPCFormer's GeLU replacement ``0.125 x^2 + 0.25 x + 0.5`` (for distilled models)."""
    return x.mpc.products([(x, x)], scale=0.125)[0] + x.mul_public(0.25).add_public(0.5)


def two_quad_softmax(scores: Shared, mask: torch.Tensor, c: float = 5.0) -> Shared:
    """MPCFormer's 2Quad: ``(s + c)^2 * mask / sum``; ``mask`` is public 0/1, broadcastable to scores.

    The row sums are assumed in ``[1, 256 n]`` (``n`` scores per row: ``|s + c| < 16``).
    """
    q = scores.add_public(c).square().mul_public(attended(mask, scores.shape).to(torch.int64))
    total = q.sum(-1, keepdim=True)
    expect_within(total, 1.0, 256.0 * scores.shape[-1], "2Quad row sum")
    y, k = _inverse(total, 1.0, 256.0 * scores.shape[-1])
    return _times_pow2(q * y, k)


def _odd_saturating(x: Shared, series: Shared, cut: float, check_range: bool) -> Shared:
    """``0.5 x (1 + g)`` with ``g`` = -1 / ``series`` / +1 for ``x < -cut`` / between / ``x >= cut``.

    The segment tests truncate ``x`` once to 4 fractional bits (the cut rounded to that grid) and
    compare ``x -+ cut`` on 15-bit lanes (|x| < 1024): ``check_range`` records ``x`` for the
    per-query range check (:mod:`.ranges`); off only where the weights prove the range
    (:func:`.approximations.activation_input_bound`).
    """
    mpc = x.mpc
    if check_range:
        expect_within(x, -SEGMENT_LIMIT, SEGMENT_LIMIT, "GeLU/SiLU input", FINE)
    bits, drop = SEGMENT_COMPARISON
    coarse = x.truncate(drop).share
    step = round(cut * 2 ** (mpc.frac_bits - drop)) if mpc.role == SERVER0 else 0  # the cut on the coarse grid
    above = drelu(mpc.shared(torch.stack([coarse + step, coarse - step])), bits)  # [x >= -cut, x >= cut]
    # 1 + g = above0 (series + 1) - above1 (series - 1): one multiplexer round on the series
    scaled, bits = above.times(series), above.arithmetic()
    return x.mpc.products([(x, scaled[0] - scaled[1] + bits[0] + bits[1])], scale=0.5)[0]


def gelu(x: Shared, check_range: bool = True) -> Shared:
    """SecFormer's GeLU: ``0.5 x (1 + erf(x / sqrt 2))`` with the segmented sine-series erf, read
    in ``x`` (period ``20 sqrt 2``, edges ``-+2.5 sqrt 2``)."""
    scale = U_SCALE["secformer_gelu"]
    return _odd_saturating(x, erf_series(x, scale), ERF_CUT / scale, check_range)


def silu(x: Shared, check_range: bool = True) -> Shared:
    """SiLU ``x sigmoid(x) = 0.5 x (1 + tanh(x / 2))`` with a segmented sine series for tanh (Llama)."""
    return _odd_saturating(x, sine_series(x, TANH_HALF_SINE_COEFFS, TANH_HALF_PERIOD), SILU_CUT, check_range)


def exp_negative(t: Shared, squarings: int = 8) -> Shared:
    """``exp(t)`` for ``-2^squarings <= t <= 0`` as ``(1 + t / 2^n)^(2^n)`` (CrypTen's limit form)."""
    y = t.mul_public(1.0 / (1 << squarings)).add_public(1.0)
    for _ in range(squarings):
        y = y.square()
    return y


def softmax(scores: Shared, mask: torch.Tensor) -> Shared:
    """Exact-style softmax over the last dim: max by comparisons, exp, Goldschmidt division.

    ``mask`` is public 0/1 (causal and padding), broadcastable to ``scores``. Masked entries are
    excluded from the max by selection, not by an additive constant: each is replaced by an
    attended score of its row (a public choice of share entries, no protocol), which leaves the
    row's max unchanged; after the exponential they are zeroed. A row that attends to nothing
    (a padding query) attends to everything, as transformers' masks make it. The exponent
    ``t = s - max`` and the row sums are range-checked (:mod:`.ranges`).
    """
    n = scores.shape[-1]
    keep = attended(mask, scores.shape)
    lowered = scores if scores.mpc.offline else scores.mpc.shared(
        torch.where(keep, scores.share, scores.share.gather(-1, _attended_column(keep))))
    t = lowered - maximum(lowered, -1, *MAX_COMPARISON)
    expect_within(t, -EXP_LIMIT, MAX_ABOVE, "softmax exponent", FINE)
    e = exp_negative(t).mul_public(keep.to(torch.int64))
    total = e.sum(-1, keepdim=True)
    # the row max is exact to 2^-3 (MAX_COMPARISON), so each e <= e^(1/8) and the largest >= e^(-1/8)
    expect_within(total, 0.85, 1.15 * n, "softmax row sum")
    y, k = _inverse(total, 0.85, 1.15 * n)
    return _times_pow2(e * y, k)


def attended(mask: torch.Tensor, shape) -> torch.Tensor:
    """The public 0/1 ``mask`` as booleans of ``shape``; rows that attend to nothing attend to everything."""
    keep = mask.to(torch.bool).expand(shape)
    return keep | ~keep.any(-1, keepdim=True)


def _attended_column(keep: torch.Tensor) -> torch.Tensor:
    """Per row, the index of its last attended column, repeated along the row (for ``gather``)."""
    positions = torch.arange(keep.shape[-1]).expand(keep.shape)
    return torch.where(keep, positions, torch.zeros_like(positions)).amax(-1, keepdim=True).expand(keep.shape)
