"""Refreshing a ciphertext through the client: the he protocol's stand-in for bootstrapping.

Stock SEAL has no bootstrapping, and at 128-bit security ``N = 2^15`` allows 19 rescales; a
model needs far more. When an operator runs out of levels (:func:`.operators.ensure`), the
server asks the client for a fresh encryption of the same value, masked so that the client
learns nothing about it (one round trip, counted):

1. Server: move the ciphertext down to the refresh level (``level`` rescales left, 3 primes by
   default: the smallest message), and add a mask ``r``: a plaintext polynomial whose ``N``
   integer coefficients are uniform in ``[-R, R]``.
2. Client: decrypt to the plaintext polynomial ``u = m + e + r`` (``m``: the encoded values,
   ``e``: the noise), read its coefficients *exactly* (:mod:`.rns`; no floating point, which
   would lose the value under the mask), and encrypt that same integer polynomial afresh at the
   top level (seed-compressed, symmetric).
3. Server: subtract ``r`` at the top level. The result encrypts ``m + e`` with a fresh
   ciphertext's levels and noise.

The refresh also resets the scale to the nominal ``D`` for free: products of ciphertexts drift
from it (``s1 s2 / q``), and the client re-encrypts ``round(u D / s)`` while the server subtracts
``round(r D / s)`` (exact rationals of the two doubles): the difference is ``(m + e) D / s`` up to
one unit per coefficient, far below the noise.

Security for the client side (semi-honest client, honest-but-curious server): the client sees
``u = (m + e) + r`` coefficient by coefficient. With ``|m + e|_inf <= B`` and ``r`` uniform on
``[-R, R]``, the statistical distance between ``u`` and ``r`` alone is at most ``N B / R``; the
mask range is ``R = 2^(sigma + log2 N) B``, so one refresh reveals at most ``2^-sigma``
(``security_bits``, default 40) about the values *and* about the noise (the mask floods it: no
separate noise flooding is needed). ``B`` follows from the value bound of the refresh
(``value_bound``, default ``2^16``: the largest ``|x|`` the model's values reach at a refresh, times
the largest scale admitted, plus ``2^NOISE_BITS`` for the noise; a slot vector with ``|x| <= X`` at scale ``D`` has coefficients at
most ``D X``). Values beyond ``value_bound`` stay correct as long as ``|u| < q / 2`` but hide
less: the distance grows in proportion. ``R`` must leave room below the refresh level's modulus
(``2 (R + B) < q``): that is checked when the Refresher is made.

The server learns nothing from the client's answer (a fresh encryption under the secret key).
"""

from __future__ import annotations

import math
import secrets
from fractions import Fraction
import time
from typing import Callable

from ...accounting import Traffic
from ...errors import ProgramError
from .backend import CKKS, Ciphertext
from .rns import plaintext_coefficients, plaintext_from_coefficients

NOISE_BITS = 30  # a generous bound on the noise of a ciphertext at a refresh (coefficients)
SCALE_RANGE = 16.0  # a ciphertext's scale may drift to D / 16 .. 16 D before it is refreshed
MIN_SECURITY_BITS = 32

Client = Callable[[bytes], bytes]


def mask_range(params, scale: float, value_bound: float, security_bits: int) -> tuple[int, int]:
    """``(B, R)``: the coefficient bound and the mask range for ``security_bits`` of statistical
    security (``N B / R <= 2^-security_bits``)."""
    bound = math.ceil(scale * value_bound) + 2**NOISE_BITS
    return bound, bound << (security_bits + int(math.log2(params.poly_degree)))


class Refresher:
    """The server's side of refreshes: ``refresher(ct, level)`` returns a fresh encryption of
    ``ct``'s values at ``level`` (default ``target``, default the top), through ``client`` (bytes in, bytes out: the
    transport's round trip). Counts rounds and bytes in :attr:`traffic`.

    Raises ProgramError at construction when the refresh level's modulus is too small for the
    mask, and :class:`~hf_secure.errors.KeyMismatchError` /
    :class:`~hf_secure.errors.CorruptKeyError` when the client's answer is not a ciphertext of
    this key and parameter set.
    """

    def __init__(self, ctx: CKKS, client: Client, value_bound: float = 2.0**16, security_bits: int = 40,
                 level: int = 2, target: int | None = None):
        if type(security_bits) is not int or security_bits < MIN_SECURITY_BITS:
            raise ProgramError(f"security_bits must be an int >= {MIN_SECURITY_BITS}, got {security_bits!r}")
        if not (isinstance(value_bound, (int, float)) and math.isfinite(value_bound) and value_bound >= 1):
            raise ProgramError(f"value_bound must be a finite number >= 1, got {value_bound!r}")
        if type(level) is not int or not 1 <= level < ctx.params.levels:
            raise ProgramError(f"refresh level {level!r} outside 1..{ctx.params.levels - 1}")
        self.ctx, self.client = ctx, client
        self.level = level
        self.target = ctx.params.levels if target is None else target
        self.bound, self.range = mask_range(ctx.params, ctx.params.scale * SCALE_RANGE, value_bound, security_bits)
        room = ctx.modulus(level)
        if 2 * (self.range + self.bound) >= room:
            raise ProgramError(
                f"a refresh at level {level} ({room.bit_length()}-bit modulus) cannot hold a "
                f"{self.range.bit_length()}-bit mask for {security_bits}-bit security: refresh higher")
        self.traffic = Traffic()

    def _mask(self) -> list[int]:
        """``N`` integers uniform on ``[-R, R]`` from the OS's CSPRNG (64 spare bits per draw: the
        reduction's bias is below ``2^-64``)."""
        span = 2 * self.range + 1
        width = (span.bit_length() + 64 + 7) // 8
        blob = secrets.token_bytes(width * self.ctx.params.poly_degree)
        return [int.from_bytes(blob[i:i + width], "little") % span - self.range for i in range(0, len(blob), width)]

    def __call__(self, ct: Ciphertext, level: int | None = None) -> Ciphertext:
        """A fresh encryption of ``ct``'s values at ``level`` levels (default :attr:`target`)."""
        ctx = self.ctx
        target = self.target if level is None else level
        if not self.level < target <= ctx.params.levels:
            raise ProgramError(f"refresh to level {target}: outside {self.level + 1}..{ctx.params.levels}")
        if ct.level < self.level:
            raise ProgramError(f"a ciphertext at level {ct.level} is below the refresh level {self.level}")
        if not ctx.params.scale / SCALE_RANGE <= ct.scale <= ctx.params.scale * SCALE_RANGE:
            raise ProgramError(f"refresh of a ciphertext at scale {ct.scale:.3g}: outside the mask's design")
        start = time.perf_counter()
        low = ctx.to_level(ct, self.level)
        r = self._mask()
        masked = ctx.add_plaintext(low, plaintext_from_coefficients(ctx.context, r, ctx.parms_id(self.level), low.scale))
        request = bytes([target]) + ctx.serialize(masked)
        answer = self.client(request)
        fresh = ctx.deserialize(answer)
        if fresh.level != target or fresh.scale != ctx.params.scale:
            raise ProgramError(f"the client's refresh came back at level {fresh.level}, scale {fresh.scale:.6g}")
        unmask = rescaled(r, ctx.params.scale, low.scale)
        out = ctx.sub_plaintext(fresh, plaintext_from_coefficients(ctx.context, unmask, ctx.parms_id(target),
                                                                   ctx.params.scale))
        self.traffic.record(len(request), len(answer), time.perf_counter() - start)
        return out


def rescaled(coeffs: list[int], scale: float, current: float) -> list[int]:
    """``round(c scale / current)`` for each integer ``c``, exactly (the doubles as rationals)."""
    ratio = Fraction(scale) / Fraction(current)
    num, den = ratio.numerator, ratio.denominator
    return [(c * num * 2 + den) // (2 * den) for c in coeffs]


def answer_refresh(ctx: CKKS, request: bytes) -> bytes:
    """The client's side of a refresh: decrypt the masked ciphertext of ``request`` (its first
    byte: the level wanted) to its exact integer polynomial and encrypt the same polynomial
    (brought to the nominal scale, :func:`rescaled`) afresh at that level, seed-compressed."""
    if not request or request[0] > ctx.params.levels:
        raise ProgramError("a refresh request names no level of these parameters")
    target, masked = request[0], ctx.deserialize(request[1:])
    coeffs = rescaled(plaintext_coefficients(ctx.context, ctx.decrypt_plaintext(masked)), ctx.params.scale,
                      masked.scale)
    try:
        pt = plaintext_from_coefficients(ctx.context, coeffs, ctx.parms_id(target), ctx.params.scale)
    except ValueError as err:  # cannot happen for q_target >= q_refresh; kept as a clear error
        raise ProgramError(f"refresh: {err}") from err
    return ctx.encrypt_plaintext(pt)
