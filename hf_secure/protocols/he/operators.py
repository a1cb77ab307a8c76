"""NEXUS's operators on CKKS ciphertexts (Zhang et al., NDSS 2025; its code zju-abclab/NEXUS at
e15058c), with 128-bit parameters and refreshes through the client instead of bootstrapping.

Every operator takes ciphertexts of one :class:`~.backend.CKKS` context and a ``refresh``
callable (:class:`.refresh.Refresher` in a session: the server masks the ciphertext, the client
re-encrypts it at the top level, one round) that it calls when the next step needs more levels
than a ciphertext has left. Without refreshes (``refresh=None``) an operator that runs out of
levels raises ProgramError; nothing returns garbage silently.

Slots hold independent values. A fold (QuickSum, QuickMax: ``log2 count`` rotations by
``stride 2^i``, ``count`` a power of two) treats the slots as a cycle: slot ``s`` combines ``s, s +
stride, ..., s + (count - 1) stride`` (mod slots). With ``count * stride = slots`` (vectors
interleaved: vector ``t`` at ``t, t + stride, ...``) every slot receives its own vector's result.

Input ranges are part of each operator's contract (``bound``, ``low``/``high``): the composite sign
needs ``[-1, 1]``, GELU ``[-bound, bound]``, the inverses ``[low, high]``. The iteration counts of
the inverses are chosen by running the same iteration in float64 over the whole range
(:func:`iterations_for`), so the stated error holds over the range, not at a sample point.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np

from ...errors import ProgramError
from .backend import CKKS, Ciphertext

Refresh = Callable[..., Ciphertext]  # (ciphertext, level=None): see refresh.Refresher

# Odd degree-9 polynomials of Cheon, Kim, Kim, Lee and Lee (ASIACRYPT 2020): f4 = sum_i 4^-i C(2i,i)
# x (1 - x^2)^i, and g4, which pushes small |x| towards +-1 fastest. NEXUS composes g4 twice, then
# f4 twice (depth 16 for inputs in [-1, 1]). Coefficients of x, x^3, x^5, x^7, x^9.
F4 = (315 / 128, -420 / 128, 378 / 128, -180 / 128, 35 / 128)
G4 = (5850 / 1024, -34974 / 1024, 97015 / 1024, -113492 / 1024, 46623 / 1024)
SIGN = (G4, G4, F4, F4)
# NEXUS's GELU middle piece on [-3.5, 3.5] (gelu.cpp): coefficients of 1, x, x^2, x^4, ..., x^12.
GELU_BREAK = 3.5
GELU_MIDDLE = {0: 2.25775755e-04, 1: 0.5, 2: 3.96880960e-01, 4: -6.37042698e-02, 6: 8.38841647e-03,
               8: -7.17830961e-04, 10: 3.49617829e-05, 12: -7.26059653e-07}


def ensure(x: Ciphertext, need: int, refresh: Refresh | None) -> Ciphertext:
    """``x`` with ``need`` levels to spend: itself, or refreshed through the client. A refresh
    happens at ``refresh.level`` (its mask needs that modulus), so those levels are never spent."""
    floor = refresh.level if refresh is not None else 0
    if x.level >= need + floor:
        return x
    if refresh is None:
        raise ProgramError(f"needs {need} levels, the ciphertext has {x.level} and no refresh is available")
    if need + floor > x.ctx.params.levels:
        raise ProgramError(f"needs {need} levels, more than a fresh ciphertext has ({x.ctx.params.levels - floor})")
    return refresh(x)


def fit(x: Ciphertext, need: int, refresh: Refresh | None) -> Ciphertext:
    """``x`` with exactly ``need`` levels to spend when refreshes are available (refreshed to that
    level if it has fewer, a smaller answer than a full one; moved down if it has more: products
    and rotations cost about the square of the primes left, so an operator of known depth runs at
    the lowest level that suffices)."""
    if refresh is None:  # levels given away could not be had back
        return ensure(x, need, refresh)
    level = need + refresh.level
    if level > x.ctx.params.levels:
        raise ProgramError(f"needs {need} levels, more than a fresh ciphertext has "
                           f"({x.ctx.params.levels - refresh.level})")
    if x.level < level:
        return refresh(x, level)
    return x.ctx.to_level(x, level) if x.level > level else x


def spendable(ctx: CKKS, refresh: Refresh | None) -> int:
    """Levels a fresh ciphertext can spend before its refresh."""
    return ctx.params.levels - (refresh.level if refresh is not None else 0)


# -- polynomials -------------------------------------------------------------------------------
def _powers(ctx: CKKS, x: Ciphertext, wanted) -> dict[int, Ciphertext]:
    """``x^i`` for each wanted ``i`` at depth ``ceil(log2 i)`` (``x^i = x^(2^k) x^(i - 2^k)``)."""
    pw = {1: x}

    def get(i: int) -> Ciphertext:
        if i not in pw:
            high = 1 << (i.bit_length() - 1)
            pw[i] = ctx.square(get(high // 2)) if high == i else ctx.multiply(get(high), get(i - high))
        return pw[i]

    for i in sorted(wanted):
        get(i)
    return pw


def polynomial_depth(degree: int) -> int:
    """Levels :func:`polynomial` takes for ``degree``: the powers, then the coefficients."""
    return max(1, math.ceil(math.log2(degree))) + 1 if degree > 1 else 1


def polynomial(ctx: CKKS, x: Ciphertext, coeffs: dict[int, float], refresh: Refresh | None = None) -> Ciphertext:
    """``sum_i coeffs[i] x^i`` in the power basis: every power times its coefficient lands on the
    nominal scale at one level. Depth :func:`polynomial_depth`; ``deg - 1`` products at most."""
    terms = {i: float(c) for i, c in coeffs.items() if c != 0}
    constant = terms.pop(0, 0.0)
    if not terms:
        raise ProgramError("a constant polynomial needs no ciphertext")
    x = ensure(x, polynomial_depth(max(terms)), refresh)
    return _combination(ctx, _powers(ctx, x, terms), terms, constant)


def _combination(ctx: CKKS, basis: dict[int, Ciphertext], coeffs: dict[int, float], constant: float,
                 scale: float | None = None) -> Ciphertext:
    """``constant + sum_k coeffs[k] basis[k]``: every term's plaintext product lands on ``scale``
    (default the nominal one) one level below the lowest basis element, so the sum is exact (one
    level)."""
    if not coeffs:
        raise ProgramError("a constant needs no ciphertext")
    level = min(basis[k].level for k in coeffs) - 1
    target = ctx.params.scale if scale is None else scale
    out = None
    for k, c in sorted(coeffs.items()):
        term = ctx.multiply_plain(ctx.to_level(basis[k], level + 1), c, scale=target)
        out = term if out is None else out + term
    return out + constant if constant else out


def chebyshev_basis(ctx: CKKS, v: Ciphertext, degree: int) -> dict[int, Ciphertext]:
    """``T_k(v)`` for ``k = 1..degree`` (``v`` in ``[-1, 1]``) at depth ``ceil(log2 k)``:
    ``T_(m+n) = 2 T_m T_n - T_(m-n)`` with ``m`` the largest power of two below ``k``."""
    t = {1: v}
    for k in range(2, degree + 1):
        m = 1 << (k.bit_length() - 1)
        if m == k:
            m = k // 2
        n = k - m
        prod = ctx.multiply(t[m], t[n])
        twice = prod + prod
        t[k] = twice - 1.0 if m == n else twice - t[m - n]
    return t


class _ChebyshevPlan:
    """Baby-step giant-step evaluation of a Chebyshev series (Han and Ki, CT-RSA 2020; Bossuat et
    al., EUROCRYPT 2021): babies ``T_1 .. T_(m-1)``, giants ``T_(m 2^j)``, and the series split
    recursively by Chebyshev division, ``p = q T_g + r`` (``g <= deg p < 2g``: ``q_0 = c_g``,
    ``q_k = 2 c_(g+k)``, ``r_k = c_k - c_(2g-k)``), down to series of degree below ``m`` (one
    plaintext-weighted sum of babies each). About ``m + log2(deg / m) + deg / m`` ciphertext
    products instead of ``deg``; depth ``ceil(log2(deg + 1))`` or one more. Every product lands
    on an exactly chosen scale, so the result is at the nominal scale exactly."""

    def __init__(self, coeffs: list[float], baby: int):
        self.baby = baby
        self.used: set[int] = set()
        self.depth, self.products = self._walk(coeffs)

    @classmethod
    def best(cls, coeffs: list[float]) -> "_ChebyshevPlan":
        degree = len(coeffs) - 1
        plans = [cls(coeffs, 1 << j) for j in range(1, max(2, degree.bit_length() + 1))]
        return min(plans, key=lambda p: (p.products + len(p.used), p.depth))

    @staticmethod
    def split(c: list[float], g: int) -> tuple[list[float], list[float]]:
        q = [c[g]] + [2 * x for x in c[g + 1:]]
        r = list(c[:g])
        for k in range(1, len(c) - g):
            r[g - k] -= c[g + k]
        return q, r

    def giant(self, c: list[float]) -> int:
        g = self.baby
        while 2 * g <= len(c) - 1:
            g *= 2
        return g

    def _walk(self, c: list[float]) -> tuple[int, int]:
        """``(depth, combination products)`` of the series ``c``; records the basis it uses."""
        support = [k for k, x in enumerate(c) if k and x != 0.0]
        if not support:
            return 0, 0
        if len(c) <= self.baby:
            self.used.update(support)
            return max(_cheb_depth(k) for k in support) + 1, 0
        g = self.giant(c)
        q, r = self.split(c, g)
        self.used.add(g)
        dq, pq = self._walk(q)
        dr, pr = self._walk(r)
        constant_q = not any(q[1:])
        return max(max(dq, _cheb_depth(g)) + 1, dr), pq + pr + (0 if constant_q else 1)

    def evaluate(self, ctx: CKKS, basis: dict[int, Ciphertext], c: list[float], scale: float):
        """The series ``c`` at exactly ``scale``: a Ciphertext, or a float for a constant series."""
        if not any(c[1:]):
            return c[0]
        if len(c) <= self.baby:
            return _combination(ctx, basis, {k: x for k, x in enumerate(c) if k and x != 0.0}, c[0], scale)
        g = self.giant(c)
        q, r = self.split(c, g)
        tg = basis[g]
        if not any(q[1:]):
            prod = ctx.multiply_plain(tg, q[0], scale=scale)
        else:
            level = min(self._level(basis, q), tg.level)
            part = self.evaluate(ctx, basis, q, scale * ctx.prime(level) / tg.scale)
            prod = ctx.multiply(part, tg)
        rest = self.evaluate(ctx, basis, r, scale)
        return prod + rest if isinstance(rest, Ciphertext) or rest else prod

    def _level(self, basis: dict[int, Ciphertext], c: list[float]) -> int:
        """The level :meth:`evaluate` leaves the series ``c`` at."""
        if len(c) <= self.baby:
            return min(basis[k].level for k, x in enumerate(c) if k and x != 0.0) - 1
        g = self.giant(c)
        q, r = self.split(c, g)
        low = basis[g].level - 1 if not any(q[1:]) else min(self._level(basis, q), basis[g].level) - 1
        return min(low, self._level(basis, r)) if any(r[1:]) else low


def _cheb_depth(k: int) -> int:
    return (k - 1).bit_length() if k > 1 else 0


def chebyshev_depth(coeffs) -> int:
    """Levels :func:`chebyshev` takes for the series ``coeffs`` (the affine map included)."""
    return 1 + _ChebyshevPlan.best([float(c) for c in coeffs]).depth


def chebyshev(ctx: CKKS, x: Ciphertext, coeffs, low: float, high: float,
              refresh: Refresh | None = None) -> Ciphertext:
    """``sum_k c_k T_k((2x - low - high) / (high - low))`` for ``x`` in ``[low, high]`` (a
    Chebyshev series is stable where a power basis of degree > 8 is not), by baby and giant
    steps (:class:`_ChebyshevPlan`). Depth :func:`chebyshev_depth`."""
    coeffs = [float(c) for c in coeffs]
    if len(coeffs) < 2 or not any(coeffs[1:]):
        raise ProgramError("a constant needs no ciphertext")
    plan = _ChebyshevPlan.best(coeffs)
    x = ensure(x, 1 + plan.depth, refresh)
    v = ctx.multiply_plain(x, 2 / (high - low)) + (-(low + high) / (high - low))
    basis = chebyshev_basis(ctx, v, min(plan.baby - 1, len(coeffs) - 1))

    def giant(g: int) -> Ciphertext:  # T_2k = 2 T_k^2 - 1, from the babies up (T_(m/2) is one)
        if g not in basis:
            square = ctx.square(giant(g // 2))
            basis[g] = square + square - 1.0
        return basis[g]

    for g in sorted(k for k in plan.used if k >= plan.baby):
        giant(g)
    return plan.evaluate(ctx, basis, coeffs, ctx.params.scale)


# 2 f(x) - x for the activations f = x/2 + (x/2) s(x) with s odd: an even, entire function of x.
ACTIVATIONS = {
    "gelu": lambda x: x * _erf(x / math.sqrt(2)),
    "gelu_tanh": lambda x: x * np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)),
    "silu": lambda x: x * np.tanh(x / 2),
}


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(x)


@functools.lru_cache(maxsize=64)
def activation_series(name: str, bound: float, tolerance: float) -> tuple[float, ...]:
    """Chebyshev coefficients, in ``u = x^2`` on ``[0, bound^2]``, of ``2 f(x) - x`` for the
    activation ``name``: the lowest degree whose error is below ``2 tolerance`` on a fine grid."""
    if name not in ACTIVATIONS:
        raise ProgramError(f"no polynomial activation {name!r}; have {sorted(ACTIVATIONS)}")
    fn = ACTIVATIONS[name]
    grid = np.linspace(0.0, bound, 20001)
    exact = fn(grid)
    for degree in range(2, 129):
        nodes = np.cos(np.pi * (np.arange(4 * degree) + 0.5) / (4 * degree))
        u = (nodes + 1) * bound**2 / 2
        coeffs = np.polynomial.chebyshev.chebfit(nodes, fn(np.sqrt(u)), degree)
        approx = np.polynomial.chebyshev.chebval(2 * grid**2 / bound**2 - 1, coeffs)
        if np.max(np.abs(approx - exact)) <= 2 * tolerance:
            return tuple(coeffs.tolist())
    raise ProgramError(f"{name} on [-{bound}, {bound}] needs degree > 128 for {tolerance:g}")


def activation(ctx: CKKS, x: Ciphertext, name: str = "gelu", bound: float = 8.0, tolerance: float = 1e-4,
               refresh: Refresh | None = None) -> Ciphertext:
    """GELU (``"gelu"``, ``"gelu_tanh"``) or SiLU (``"silu"``) of ``x`` in ``[-bound, bound]``
    without a comparison: ``f(x) = x/2 + g(x^2)/2`` where ``g(x^2) = 2 f(x) - x`` (``x erf(x /
    sqrt 2)`` for GELU, ``x tanh(x/2)`` for SiLU) is even and entire, so a low-degree Chebyshev
    series in ``x^2`` reaches ``tolerance`` (GELU on [-8, 8]: degree 16 for 1e-4; on [-37, 37],
    where BERT's outlier features reach, degree 68). Outside the bound the series diverges.
    Depth ``1 +`` :func:`chebyshev_depth` of the series (the square, then the series)."""
    coeffs = [c / 2 for c in activation_series(name, float(bound), float(tolerance))]
    x = fit(x, 1 + chebyshev_depth(coeffs), refresh)
    half_g = chebyshev(ctx, ctx.square(x), coeffs, 0.0, bound * bound)
    return half_g + ctx.multiply_plain(ctx.to_level(x, half_g.level + 1), 0.5, scale=half_g.scale)


def odd9(ctx: CKKS, x: Ciphertext, c: tuple, refresh: Refresh | None = None) -> Ciphertext:
    """``c1 x + c3 x^3 + c5 x^5 + c7 x^7 + c9 x^9`` at depth 4 with 5 products, as NEXUS
    (``(c3 + c5 x^2) x^3 + (c7 x + c9 x^3) x^6 + c1 x``)."""
    c1, c3, c5, c7, c9 = c
    x = ensure(x, 4, refresh)
    x2 = ctx.square(x)
    x3 = ctx.multiply(x2, x)
    x6 = ctx.square(x3)
    # each plaintext product lands where its product with x3 or x6 gives the nominal scale, so
    # the result is exactly at the nominal scale (composition does not compound scale drift)
    t1 = ctx.multiply(ctx.multiply_plain(x2, c5, scale=ctx.landing_scale(x3, x2.level - 1)) + c3, x3)
    inner_scale = ctx.landing_scale(x6, x6.level)
    inner = (ctx.multiply_plain(ctx.to_level(x, x3.level + 1), c7, scale=inner_scale)
             + ctx.multiply_plain(x3, c9, scale=inner_scale))
    t2 = ctx.multiply(inner, x6)
    t3 = ctx.to_level(ctx.multiply_plain(x, c1), t2.level, t2.scale)
    return ctx.to_level(t1, t2.level, t2.scale) + t2 + t3


def sign(ctx: CKKS, x: Ciphertext, refresh: Refresh | None = None, compositions=SIGN) -> Ciphertext:
    """``sgn(x)`` (+-1) for ``x`` in ``[-1, 1]`` by composite odd polynomials (NEXUS: ``g4 g4 f4
    f4``, depth 16, 20 products). Within ``2^-10`` of +-1 for ``|x| >= 0.02`` (tests); values
    in between below that; ``|x| > 1`` diverges (callers normalise)."""
    x = fit(x, min(4 * len(compositions), spendable(ctx, refresh) // 4 * 4), refresh)
    for c in compositions:
        x = odd9(ctx, x, c, refresh)
    return x


# -- folds ---------------------------------------------------------------------------------------
def quick_sum(ctx: CKKS, x: Ciphertext, count: int, stride: int = 1) -> Ciphertext:
    """Every slot ``s`` gets ``sum_{i < count} x[s + i stride]`` (cyclic): NEXUS's QuickSum,
    ``log2 count`` rotations, no level."""
    step = stride
    for _ in range(_log2(count)):
        x = x + ctx.rotate(x, step)
        step *= 2
    return x


def _mul(ctx: CKKS, a: Ciphertext, b: Ciphertext, refresh: Refresh | None) -> Ciphertext:
    return ctx.multiply(ensure(a, 1, refresh), ensure(b, 1, refresh))


def _square(ctx: CKKS, a: Ciphertext, refresh: Refresh | None) -> Ciphertext:
    return ctx.square(ensure(a, 1, refresh))


def _times(ctx: CKKS, a: Ciphertext, c, refresh: Refresh | None) -> Ciphertext:
    return ctx.multiply_plain(ensure(a, 1, refresh), c)


def maximum(ctx: CKKS, a: Ciphertext, b: Ciphertext, bound: float, refresh: Refresh | None = None) -> Ciphertext:
    """``max(a, b) = (a + b)/2 + (a - b)/2 sgn((a - b) / 2 bound)`` for ``|a|, |b| <= bound``
    (NEXUS's QuickMax step). Depth 18."""
    d = a - b
    s = sign(ctx, _times(ctx, d, 1 / (2 * bound), refresh), refresh)
    half = _mul(ctx, _times(ctx, d, 0.5, refresh), s, refresh)
    return _times(ctx, a + b, 0.5, refresh) + half


def quick_max(ctx: CKKS, x: Ciphertext, count: int, stride: int, bound: float,
              refresh: Refresh | None = None) -> Ciphertext:
    """Every slot gets the maximum of its vector (NEXUS's QuickMax: ``log2 count`` steps of
    :func:`maximum` with rotations). ``|x| <= bound``."""
    step = stride
    for _ in range(_log2(count)):
        x = maximum(ctx, x, ctx.rotate(x, step), bound, refresh)
        step *= 2
    return x


def argmax(ctx: CKKS, x: Ciphertext, count: int, stride: int, bound: float, gap: float,
           refresh: Refresh | None = None) -> Ciphertext:
    """One-hot of each vector's maximum: ``(1 + sgn((x - max + gap/2) / (2 bound + gap))) / 2``
    (NEXUS: QuickMax, then the sign of ``x - max``). ``gap``: the smallest difference between the
    largest and second-largest value that must be told apart (ties give 1 for each)."""
    m = quick_max(ctx, x, count, stride, bound, refresh)
    d = x - m + gap / 2
    s = sign(ctx, _times(ctx, d, 1 / (2 * bound + gap), refresh), refresh)
    return _times(ctx, s, 0.5, refresh) + 0.5


# -- nonlinear functions -------------------------------------------------------------------------
def gelu_pieces(ctx: CKKS, x: Ciphertext, bound: float = 5.0, refresh: Refresh | None = None) -> Ciphertext:
    """GELU for ``x`` in ``[-bound, bound]`` by NEXUS's sign-selected pieces (for comparison; the
    models use :func:`activation`, 5x fewer products for a smaller error): 0 below -3.5, its
    degree-12 polynomial on [-3.5, 3.5], ``x`` above; the signs of ``(x +- 3.5) / (bound + 3.5)``
    select. Depth 18 (the signs) + 1."""
    norm = 1 / (bound + GELU_BREAK)
    low = sign(ctx, _times(ctx, x + GELU_BREAK, norm, refresh), refresh)  # +1 above -3.5
    high = sign(ctx, _times(ctx, x - GELU_BREAK, norm, refresh), refresh)  # +1 above 3.5
    inside = _times(ctx, low - high, 0.5, refresh)  # 1 on (-3.5, 3.5)
    above = _times(ctx, high, 0.5, refresh) + 0.5
    middle = polynomial(ctx, x, GELU_MIDDLE, refresh)
    return _mul(ctx, middle, inside, refresh) + _mul(ctx, x, above, refresh)


@functools.lru_cache(maxsize=64)
def exp_plan(bound: float, tolerance: float) -> int:
    """The least ``r`` for which ``t(x / 2^r)^(2^r)``, ``t`` the cubic Taylor polynomial of exp,
    is within ``tolerance`` of ``exp(x)`` on ``[-bound, 0]`` (float64, on a fine grid)."""
    x = np.linspace(-bound, 0.0, 100001)
    for r in range(1, 16):
        y = x / 2**r
        if np.max(np.abs((1 + y + y * y / 2 + y**3 / 6) ** (2**r) - np.exp(x))) <= tolerance:
            return r
    raise ProgramError(f"exp on [-{bound}, 0] to {tolerance:g} needs r > 15")


def exp_negative(ctx: CKKS, x: Ciphertext, bound: float, tolerance: float = 1e-4,
                 refresh: Refresh | None = None) -> Ciphertext:
    """``exp(x)`` for ``x`` in ``[-bound, 0]`` by ``t(x / 2^r)^(2^r)`` with ``t`` the cubic Taylor
    polynomial (NEXUS squares ``1 + x / 2^r``, r = 7, error 1.7e-3 on [-10, 0]; the cubic reaches
    ``1e-4`` with ``r = 4``, one level less). Depth ``3 + r`` (:func:`exp_plan`)."""
    r = exp_plan(float(bound), float(tolerance))
    taylor = {0: 1.0, 1: 1 / 2**r, 2: 1 / (2 * 4**r), 3: 1 / (6 * 8**r)}
    y = polynomial(ctx, fit(x, min(3 + r, spendable(ctx, refresh)), refresh), taylor, refresh)
    for _ in range(r):
        y = _square(ctx, y, refresh)
    return y


def iterations_for(step, start: np.ndarray, target: np.ndarray, tolerance: float, limit: int = 30) -> int:
    """How many times ``step`` must run from ``start`` before ``|y / target - 1| <= tolerance``
    everywhere on the grid (float64, the operator's own arithmetic); ProgramError past ``limit``."""
    y = start
    for k in range(limit + 1):
        if np.max(np.abs(y / target - 1)) <= tolerance:
            return k
        y = step(y)
    raise ProgramError(f"no convergence to {tolerance:g} in {limit} steps")


def _grid(low: float, high: float) -> np.ndarray:
    return np.geomspace(low, high, 4097)


def inverse(ctx: CKKS, x: Ciphertext, low: float, high: float, tolerance: float = 2**-14,
            refresh: Refresh | None = None) -> Ciphertext:
    """``1 / x`` for ``x`` in ``[low, high]`` (``0 < low``) by Goldschmidt's iteration (NEXUS):
    with ``a = x / high`` and ``e = 1 - a``, ``1/a = prod_k (1 + e^(2^k))``; one level per factor.
    Relative error ``(1 - low/high)^(2^k)``, below ``tolerance``."""
    if not 0 < low < high:
        raise ProgramError(f"inverse needs 0 < low < high, got [{low}, {high}]")
    k = max(1, math.ceil(math.log2(math.log(tolerance) / math.log(1 - low / high))))
    e = ctx.multiply_plain(ensure(x, min(k + 1, spendable(ctx, refresh)), refresh), -1 / high) + 1.0
    y = e + 1.0
    for _ in range(k - 1):
        e = _square(ctx, e, refresh)
        y = _mul(ctx, y, e + 1.0, refresh)
    return _times(ctx, y, 1 / high, refresh)


GUESS_DEGREES = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64, 96, 128)


@functools.lru_cache(maxsize=64)
def inverse_sqrt_plan(ratio: float, tolerance: float, levels: int = 64) -> tuple[tuple[float, ...], int]:
    """The initial guess and Newton steps of :func:`inverse_sqrt` on ``a`` in ``[ratio, 1]``:
    Chebyshev coefficients (on ``[ratio, 1]``) of a fit of ``1/sqrt a`` for small relative
    error, of a degree in :data:`GUESS_DEGREES` whose evaluation takes at most ``levels``, and the
    number of Newton steps after which the float64 iteration is within ``tolerance`` everywhere;
    the pair of least depth (3 per step), then fewest products. A wide range (BERT's variances
    span 1e-5 of their maximum) takes a high degree: 128 and 4 steps instead of 7 and 11."""
    a = _grid(ratio, 1.0)
    target = 1 / np.sqrt(a)
    nodes = np.cos(np.pi * (np.arange(256) + 0.5) / 256)
    at = ratio + (nodes + 1) * (1 - ratio) / 2
    best = None
    for degree in GUESS_DEGREES:
        coeffs = np.polynomial.chebyshev.chebfit(nodes, 1 / np.sqrt(at), degree, w=np.sqrt(at))
        if chebyshev_depth(coeffs) > levels:
            break
        start = np.polynomial.chebyshev.chebval(2 * (a - ratio) / (1 - ratio) - 1, coeffs)
        if np.any(start <= 0) or np.any(start * np.sqrt(a) >= math.sqrt(3)):
            continue  # Newton would not converge from there
        try:
            steps = iterations_for(lambda y: y * (1.5 - 0.5 * a * y * y), start, target, tolerance)
        except ProgramError:
            continue
        plan = _ChebyshevPlan.best(coeffs.tolist())
        cost = (chebyshev_depth(coeffs) + 3 * steps, plan.products + len(plan.used) + 3 * steps)
        if best is None or cost < best[0]:
            best = (cost, tuple(coeffs.tolist()), steps)
    if best is None:
        raise ProgramError(f"no inverse square root plan for a range ratio of {ratio:g}")
    return best[1], best[2]


def inverse_sqrt(ctx: CKKS, x: Ciphertext, low: float, high: float, tolerance: float = 2**-14,
                 refresh: Refresh | None = None) -> Ciphertext:
    """``1 / sqrt(x)`` for ``x`` in ``[low, high]`` (``0 < low``): on ``a = x / high``, an
    initial guess by a low-degree fit (NEXUS: a linear guess, good for ``high/low`` up to ~50),
    then Newton ``y <- y (3 - a y^2) / 2`` until the relative error is below ``tolerance`` over
    the whole range (:func:`inverse_sqrt_plan`), plus the fixed-point error of ``a`` (about
    ``2^-40 high / x`` relative, magnified by the steps: 2e-4 at ``high / low = 10^4``). Depth:
    the guess's, plus 3 per step, plus 1."""
    if not 0 < low < high:
        raise ProgramError(f"inverse_sqrt needs 0 < low < high, got [{low}, {high}]")
    coeffs, steps = inverse_sqrt_plan(low / high, tolerance, spendable(ctx, refresh))
    a = _times(ctx, x, 1 / high, refresh)
    y = chebyshev(ctx, a, coeffs, low / high, 1.0, refresh)
    minus_half_a = _times(ctx, a, -0.5, refresh)
    for _ in range(steps):
        y = ensure(y, 3, refresh)
        t = _mul(ctx, ctx.square(y), minus_half_a, refresh) + 1.5
        y = _mul(ctx, y, t, refresh)
    return _times(ctx, y, 1 / math.sqrt(high), refresh)


def softmax(ctx: CKKS, x: Ciphertext | list[Ciphertext], count: int, stride: int, bound: float,
            refresh: Refresh | None = None, keep=None, span: int | None = None) -> Ciphertext | list[Ciphertext]:
    """Softmax of each vector of scores (``|x| <= bound``): ``count`` values ``stride`` apart in
    each ciphertext of ``x`` (a list: the vector spans them all). The maximum is subtracted
    (elementwise across the ciphertexts, then QuickMax), :func:`exp_negative` on ``[-2 bound,
    0]``, QuickSum, Goldschmidt's inverse on ``[1, count len(x)]`` (the maximum contributes
    ``exp(0) = 1``). ``keep``: 0/1 plaintext vectors over the slots, one per ciphertext (masked
    scores, e.g. causal or padding, get weight 0: set to ``-bound`` before the maximum, so it is
    taken over the kept ones, and zeroed after exp). ``span``: for one ciphertext, only the first
    ``span`` positions of each vector are ever kept (e.g. keys of a block shorter than the
    vector): the maximum folds over ``next_power_of_two(span)`` positions and is broadcast from
    position 0 (a 0/1 product and QuickSum), one :func:`maximum` step less per halving. Slots
    must interleave the vectors (``count * stride = slots``)."""
    single = isinstance(x, Ciphertext)
    xs = [x] if single else list(x)
    keeps = ([keep] if single else list(keep)) if keep is not None else [None] * len(xs)
    keeps = [None if k is None else np.asarray(k, dtype=np.float64) for k in keeps]
    if any(k is not None and not k.any() for k in keeps):
        raise ProgramError("a softmax keep mask with no key at all in a ciphertext")
    xs = [c if k is None else _times(ctx, c, k, refresh) + (k - 1) * bound for c, k in zip(xs, keeps, strict=True)]
    m = xs[0]
    for c in xs[1:]:
        m = maximum(ctx, m, c, bound, refresh)
    folds = count
    if span is not None:
        if len(xs) != 1 or not 0 < span <= count or count * stride != ctx.params.slots:
            raise ProgramError(f"softmax span {span} needs one ciphertext of interleaved vectors of {count}")
        folds = 1 << (span - 1).bit_length()
    m = quick_max(ctx, m, folds, stride, bound, refresh)
    if folds < count:  # position 0 holds the maximum of the span: broadcast it to the vector
        first = ((np.arange(ctx.params.slots) // stride) % count == 0).astype(np.float64)
        m = quick_sum(ctx, _times(ctx, m, first, refresh), count, stride)
    es = [exp_negative(ctx, c - m, 2 * bound, refresh=refresh) for c in xs]
    es = [e if k is None else _times(ctx, e, k, refresh) for e, k in zip(es, keeps)]
    inv = inverse(ctx, quick_sum(ctx, _sum(es), count, stride), 1.0, float(count * len(es)), refresh=refresh)
    out = [_mul(ctx, e, inv, refresh) for e in es]
    return out[0] if single else out


def layer_norm(ctx: CKKS, x: Ciphertext | list[Ciphertext], count: int, stride: int, gamma, beta, eps: float,
               var_low: float, var_high: float, refresh: Refresh | None = None, center: bool = True,
               size: int | None = None) -> Ciphertext | list[Ciphertext]:
    """LayerNorm of each vector: ``(x - mean) / sqrt(var + eps) gamma + beta`` (``center=False``:
    RMSNorm, ``x / sqrt(mean x^2 + eps) gamma``, ``beta`` None). A vector is ``count`` values
    ``stride`` apart in each ciphertext of ``x`` (a list: the vector spans them all, e.g. a
    token's features over several ciphertexts); ``size`` is its number of real entries (default
    all; the rest must be 0, and ``gamma``/``beta`` 0 there keep them 0). ``gamma``, ``beta``:
    plaintext vectors over the slots, one per ciphertext. ``var + eps`` (the mean square for
    RMSNorm) must lie in ``[var_low, var_high]``. The variance is ``E[x^2] - E[x]^2`` (depth 2,
    folded at the lowest level: with a refresh, it is refreshed for the inverse square root),
    then the inverse square root, then 2."""
    single = isinstance(x, Ciphertext)
    xs = [x] if single else list(x)
    gammas = [gamma] if single else list(gamma)
    betas = [beta] if single else list(beta) if beta is not None else [None] * len(xs)
    size = size or count * len(xs)
    # the folds (2 log2 count rotations) run two levels above the floor, where rotations are
    # cheap; the variance is then refreshed to the depth of the inverse square root
    xs = [fit(c, 2, refresh) for c in xs]
    squares = [ctx.square(c) for c in xs]
    mean_square = ctx.multiply_plain(quick_sum(ctx, _sum(squares), count, stride), 1 / size)
    var = mean_square + eps
    mean = None
    if center:
        mean = ctx.multiply_plain(quick_sum(ctx, _sum(xs), count, stride), 1 / size)
        var = var - ctx.square(mean)
    inv = inverse_sqrt(ctx, var, var_low, var_high, refresh=refresh)
    out = []
    for c, g, b in zip(xs, gammas, betas, strict=True):
        centered = c - mean if center else c
        y = _times(ctx, _mul(ctx, centered, inv, refresh), g, refresh)
        out.append(y + b if b is not None else y)
    return out[0] if single else out


def _sum(cts: list[Ciphertext]) -> Ciphertext:
    total = cts[0]
    for c in cts[1:]:
        total = total + c
    return total


def _log2(count: int) -> int:
    if count < 1 or count & (count - 1):
        raise ProgramError(f"fold size {count} is not a power of two")
    return count.bit_length() - 1
