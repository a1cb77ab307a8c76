"""Ciphertext-plaintext matrix products with NEXUS's compression (NDSS 2025, Section IV-A).

The client packs the rows of its matrix ``X`` (``n x m``) as *coefficients* of plaintext
polynomials: row ``k`` becomes the ``2m`` coefficients of the CKKS encoding of its ``m`` values
in the subring of degree ``2m`` (``Y = X^R``, ``R = N / 2m`` rows per polynomial), interleaved so
that coefficient ``k + R c`` of polynomial ``j`` is coefficient ``c`` of row ``j R + k``. One
ciphertext carries ``N / 2`` values, like a slot-packed one, but it needs no rotation to take
apart: the server *expands* it with ``log2 R`` rounds of Subs (the automorphisms ``X -> X^(N/2^i
+ 1)``, :meth:`~.backend.CKKS.apply_galois`) and monomial products into ``R`` ciphertexts, the
``k``-th holding ``R`` times row ``k`` repeated across all slots (period ``m``). A product with a
plaintext matrix ``W`` (``p x n``) is then a sum of slot-wise products: output ciphertext ``b``
holds rows ``b G .. (b+1) G - 1`` of ``W X`` (``G = N / 2m``), slot ``s`` being entry ``(b G + s //
m, s mod m)``.

NEXUS expands all the way to one value per ciphertext (``log2 N`` rounds, 8192 ciphertexts per
input at ``N = 2^13``); stopping at rows (``log2 R`` rounds) keeps the same products with ``m``
times fewer Subs. The outputs come at the input's level minus one, the lowest level when the
input is encrypted at level 1 (the smallest upload).

Inside a model, activations are slot-packed (they come out of the nonlinear operators that way):
:class:`SlotLinear` multiplies those by baby-step giant-step diagonals, about ``2 sqrt(per_ct)``
rotations per ciphertext where an expansion would take ``per_ct - 1`` Subs.
"""

from __future__ import annotations

import math

import numpy as np

from ...errors import ProgramError
from .backend import CKKS, Ciphertext
from .rns import plaintext_from_coefficients


def _roots_order(n: int) -> np.ndarray:
    """Slot ``j`` of a degree-``n`` CKKS encoding is the value at ``exp(i pi (3^j mod 2n) / n)``:
    the exponents ``(3^j mod 2n)`` for ``j < n/2``."""
    out = np.empty(n // 2, dtype=np.int64)
    e = 1
    for j in range(n // 2):
        out[j] = e
        e = e * 3 % (2 * n)
    return out


def encode_coefficients(values: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` real coefficients ``c`` of the degree-``n`` polynomial whose value at the slot
    roots ``exp(i pi 3^j / n)`` is ``values[j]`` (``n/2`` reals or complex; SEAL's CKKS encoding
    before scaling and rounding). float64, ``[n]``."""
    z = np.zeros(n // 2, dtype=np.complex128)
    z[:len(values)] = values
    full = np.zeros(n, dtype=np.complex128)  # the values at all odd roots: slots and conjugates
    e = _roots_order(n)
    full[(e - 1) // 2] = z
    full[(2 * n - e - 1) // 2] = np.conj(z)
    # P(w_t) = sum_k c_k w_t^k over the odd roots w_t = exp(i pi (2t+1) / n): an inverse DFT of
    # c_k exp(i pi k / n), so c_k = exp(-i pi k / n) DFT(P(w))_k / n
    k = np.arange(n)
    return (np.fft.fft(full) * np.exp(-1j * np.pi * k / n)).real / n


def pack_rows(ctx: CKKS, x: np.ndarray, level: int = 1) -> list[bytes]:
    """The client's upload of ``x`` (``n x m`` floats, ``m`` a power of two, ``2m <= N``): its
    rows packed as coefficients (see the module docstring), encrypted at ``level`` with the
    secret key, seed-compressed. ``ceil(n / R)`` ciphertexts, ``R = N / 2m`` rows each."""
    n_rows, m = x.shape
    sub = 2 * m
    if m & (m - 1) or sub > ctx.params.poly_degree:
        raise ProgramError(f"row length {m} must be a power of two with 2m <= N")
    per = ctx.params.poly_degree // sub
    scale = ctx.params.scale
    out = []
    for start in range(0, n_rows, per):
        coeffs = np.zeros((sub, per))
        for k, row in enumerate(x[start:start + per]):
            coeffs[:, k] = encode_coefficients(row, sub)
        ints = [int(v) for v in np.rint(coeffs.reshape(-1) * scale)]  # index c * R + k
        pt = plaintext_from_coefficients(ctx.context, ints, ctx.parms_id(level), scale)
        out.append(ctx.encrypt_plaintext(pt))
    return out


def expand(ctx: CKKS, ct: Ciphertext, count: int) -> list[Ciphertext]:
    """Split a coefficient-packed ciphertext into ``count`` (``R``, a power of two) ciphertexts:
    the ``k``-th holds ``R`` times the subring polynomial of residue ``k`` (row ``k``, repeated in
    the slots). ``count - 1`` Subs (Galois elements ``N / 2^i + 1``, i < log2 count), no level."""
    n = ctx.params.poly_degree
    rounds = int(math.log2(count))
    if 1 << rounds != count or count > n:
        raise ProgramError(f"expansion into {count} ciphertexts: not a power of two up to N")
    parts = [ct]
    for i in range(rounds):
        element = n // (1 << i) + 1
        shift = -(1 << i)
        nxt = []
        for c in parts:
            sub = ctx.apply_galois(c, element)
            nxt.append(c + sub)
            nxt.append(ctx.multiply_monomial(c - sub, shift))
        parts = nxt
    # parts[p] holds residue bitreverse(p)
    order = [int(format(p, f"0{rounds}b")[::-1], 2) if rounds else 0 for p in range(count)]
    out = [None] * count
    for p, k in enumerate(order):
        out[k] = parts[p]
    return out


def expansion_elements(ctx: CKKS, count: int) -> list[int]:
    """The Galois elements :func:`expand` needs for ``count`` outputs."""
    n = ctx.params.poly_degree
    return [n // (1 << i) + 1 for i in range(int(math.log2(count)))]


def matmul_expanded(ctx: CKKS, rows: list[Ciphertext], w: np.ndarray, m: int) -> list[Ciphertext]:
    """``W X`` for ``W`` (``p x n`` floats) and the expanded rows of ``X`` (``rows[k]``: ``R``
    times row ``k``, repeated with period ``m``): ``ceil(p m / slots)`` ciphertexts, output ``b``
    holding entry ``(b G + s // m, s mod m)`` in slot ``s`` (``G = slots / m``). One level."""
    p, n = w.shape
    if n != len(rows):
        raise ProgramError(f"W has {n} columns for {len(rows)} rows of X")
    slots = ctx.params.slots
    per_out = slots // m
    count = ctx.params.poly_degree // (2 * m)  # the expansion's factor R
    out = []
    for start in range(0, p, per_out):
        block = w[start:start + per_out] / count
        vectors = [np.repeat(np.pad(block[:, k], (0, per_out - len(block))), m) for k in range(n)]
        out.append(ctx.dot_plain(rows, vectors))
    return out


def unpack_rows(values: list[np.ndarray], p: int, m: int) -> np.ndarray:
    """The client's view of :func:`matmul_expanded`'s decrypted outputs: ``W X`` as ``p x m``."""
    return np.concatenate([v.reshape(-1, m) for v in values])[:p]


class SlotLinear:
    """``y = x W + b`` on slot-packed activations (:class:`.layout.Layout`): Halevi and Shoup's
    diagonals with baby and giant steps.

    In a ciphertext of the layout, a rotation by ``L`` (the token positions) moves every token's
    features one step along a cycle of ``per_ct`` positions (feature ``j`` sits at position
    ``offset_j / L``), for all tokens at once. So a block of ``W`` is the sum over shifts ``d`` of
    ``diag_d * rot(x, d L)``; with ``d = g G + b``, ``y_J = sum_g rot(sum_(c, b) rot(diag, -g G L) *
    rot(x_c, b L), g G L)``: ``G - 1`` baby rotations per input ciphertext (shared by every
    output), ``per_ct / G - 1`` giant ones per output ciphertext, and one plaintext product per
    ``(input, output, shift)`` (``width_in * width_out / per_ct`` in all, the least slot products
    can do). One level. ``weight``: ``[width_in, width_out]`` (transformers' Linear weight
    transposed). Its rotation steps: :meth:`steps`.
    """

    def __init__(self, ctx: CKKS, weight: np.ndarray, bias: np.ndarray | None, layout_in, layout_out):
        if layout_in.tokens != layout_out.tokens or weight.shape != (layout_in.width, layout_out.width):
            raise ProgramError(f"weight {weight.shape} does not map {layout_in} to {layout_out}")
        if layout_in.per_ct != layout_out.per_ct:
            raise ProgramError("input and output layouts must hold as many features per ciphertext")
        self.ctx, self.layout_in, self.layout_out = ctx, layout_in, layout_out
        f = layout_in.per_ct
        self.baby = baby_step(f)
        position_in = layout_in.feature_offsets() // layout_in.tokens  # feature j -> cycle position
        position_out = layout_out.feature_offsets() // layout_out.tokens
        padded = np.zeros((layout_in.count * f, layout_out.count * f))
        padded[:weight.shape[0], :weight.shape[1]] = weight
        # m[c][J][p, q]: the weight from input position p of ciphertext c to output position q of J
        self.m = [[np.zeros((f, f)) for _ in range(layout_out.count)] for _ in range(layout_in.count)]
        for c in range(layout_in.count):
            for out in range(layout_out.count):
                block = padded[c * f:(c + 1) * f, out * f:(out + 1) * f]
                self.m[c][out][np.ix_(position_in, position_out)] = block
        self.bias = None if bias is None else layout_out.per_feature(np.asarray(bias, dtype=np.float64))

    @staticmethod
    def steps(layout) -> list[int]:
        """The rotation steps of a product on ``layout``: baby ``b L`` and giant ``g G L``."""
        f, tokens = layout.per_ct, layout.tokens
        g = baby_step(f)
        return sorted({b * tokens for b in range(1, g)} | {k * g * tokens for k in range(1, f // g)})

    def _vector(self, c: int, out: int, giant: int, b: int) -> np.ndarray:
        f, tokens = self.layout_in.per_ct, self.layout_in.tokens
        q = np.arange(f)
        values = self.m[c][out][(q + b) % f, (q - giant * self.baby) % f]
        return np.repeat(values, tokens)  # slot q L + t

    def __call__(self, cts: list[Ciphertext]) -> list[Ciphertext]:
        ctx, f, tokens = self.ctx, self.layout_in.per_ct, self.layout_in.tokens
        level = min(ct.level for ct in cts)
        cts = [ctx.to_level(ct, level, cts[0].scale) if ct.level > level else ct for ct in cts]
        babies = [[ctx.rotate(ct, b * tokens) for b in range(self.baby)] for ct in cts]
        flat = [r for per in babies for r in per]
        outs = []
        for out in range(self.layout_out.count):
            total = None
            for giant in range(f // self.baby):
                vectors = [self._vector(c, out, giant, b) for c in range(len(cts)) for b in range(self.baby)]
                if not any(np.any(v) for v in vectors):
                    continue
                inner = ctx.dot_plain(flat, vectors)
                part = ctx.rotate(inner, giant * self.baby * tokens)
                total = part if total is None else total + part
            if total is None:
                raise ProgramError("an output ciphertext with no weight: the layouts do not match the weight")
            outs.append(total + self.bias[out] if self.bias is not None else total)
        return outs


def baby_step(per_ct: int) -> int:
    """``G``: the power of two nearest ``sqrt(per_ct)`` from above."""
    return 1 << ((per_ct.bit_length() - 1 + 1) // 2)
