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
    """``y = x W + b`` on slot-packed activations (:class:`.layout.Layout`), by expansion.

    The expansion of a slot-packed ciphertext (``log2 per_ct`` rounds of Subs) gives ``per_ct``
    ciphertexts ``E_k`` that are constant on each token's orbit of slots: ``E_k(t) = zeta^(-e_t k)
    sum_j omega^(-a_tj k) x[t, j]``, a DFT of the token's features (``omega = exp(2 pi i / per_ct)``,
    ``zeta = exp(i pi / N)``, ``e_t = 3^t mod 2N``, ``a_tj = 3^t alpha_j mod per_ct`` with
    ``alpha_j`` fixed by feature ``j``'s slot). So ``x[t] W`` is ``sum_k P_k(t) E_k(t)`` for
    plaintexts ``P_k(t, g) = zeta^(e_t k) V[3^t k mod per_ct, g] / per_ct`` with ``V = Omega W``,
    ``Omega[k, j] = omega^(alpha_j k)``: one plaintext product per ``(input ciphertext, k, output
    ciphertext)``, ``width_in * width_out / per_ct`` in all, as many as slot products can be. One
    level. ``weight``: ``[width_in, width_out]`` (transformers' Linear weight transposed).
    """

    def __init__(self, ctx: CKKS, weight: np.ndarray, bias: np.ndarray | None, layout_in, layout_out):
        if layout_in.tokens != layout_out.tokens or weight.shape != (layout_in.width, layout_out.width):
            raise ProgramError(f"weight {weight.shape} does not map {layout_in} to {layout_out}")
        self.ctx, self.layout_in, self.layout_out = ctx, layout_in, layout_out
        n, f = ctx.params.poly_degree, layout_in.per_ct
        exponents = np.array([pow(3, int(o), 2 * n) for o in layout_in.feature_offsets()], dtype=np.int64)
        alpha = ((exponents - 1) % (2 * n)) // (2 * n // f)
        k = np.arange(f)
        omega = np.exp(2j * np.pi * (np.outer(k, alpha) % f) / f)
        padded = np.zeros((layout_in.count * f, layout_out.count * layout_out.per_ct))
        padded[:weight.shape[0], :weight.shape[1]] = weight
        self.v = [omega @ padded[c * f:(c + 1) * f] for c in range(layout_in.count)]  # [f, out] each
        tokens = np.arange(layout_in.tokens)
        e_t = np.array([pow(3, int(t), 2 * n) for t in tokens], dtype=np.int64)
        self.phase = np.exp(1j * np.pi * ((np.outer(e_t, k) % (2 * n)) / n))  # [tokens, k]
        self.index = np.outer(np.array([pow(3, int(t), f) for t in tokens]), k) % f  # [tokens, k]
        self.bias = None if bias is None else layout_out.per_feature(np.asarray(bias, dtype=np.float64))
        self._slots = layout_out.feature_offsets()[None, :] + tokens[:, None]  # [tokens, out per ct]

    def _vector(self, c: int, k: int, out: int) -> np.ndarray:
        f_out = self.layout_out.per_ct
        block = self.v[c][self.index[:, k], out * f_out:(out + 1) * f_out]  # [tokens, f_out]
        vec = np.zeros(self.ctx.params.slots, dtype=np.complex128)
        vec[self._slots] = block * self.phase[:, k:k + 1] / self.layout_in.per_ct
        return vec

    def expand(self, cts: list[Ciphertext]) -> list[list[Ciphertext]]:
        """Each input ciphertext expanded (all at one level and scale first)."""
        level = min(ct.level for ct in cts)
        cts = [self.ctx.to_level(ct, level, cts[0].scale) if ct.level > level else ct for ct in cts]
        return [expand(self.ctx, ct, self.layout_in.per_ct) for ct in cts]

    def __call__(self, expanded: list[list[Ciphertext]]) -> list[Ciphertext]:
        flat = [e for part in expanded for e in part]
        outs = []
        for out in range(self.layout_out.count):
            vectors = (self._vector(c, k, out) for c in range(len(expanded)) for k in range(self.layout_in.per_ct))
            y = self.ctx.dot_plain(flat, vectors)
            outs.append(y + self.bias[out] if self.bias is not None else y)
        return outs
