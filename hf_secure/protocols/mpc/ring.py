"""Fixed-point numbers on the ring Z_2^64, held as int64 tensors (arithmetic wraps modulo 2^64).

A real ``x`` is encoded as ``round(x * 2^f)`` with ``f`` fractional bits. Additive sharing splits
a ring element ``v`` into ``v0`` uniform and ``v1 = v - v0``; either share alone is uniform and says
nothing about ``v``.

Products of two encodings carry ``2f`` fractional bits and are truncated back to ``f``. Local
share truncation (SecureML): party 0 computes ``v0 >> f``, party 1 computes ``-((-v1) >> f)``; the
result is ``v >> f`` up to an error of one unit in the last place, except with probability about
``2^(l_v + 1 - 64)`` (``|v| < 2^l_v``), when the shares straddle the wrap-around and the result is
off by about ``2^(64 - f)``: a catastrophic but rare failure. With f = 16 and values below 2^31 in
magnitude (|x| < 2^15 before the product's extra 2^16), that is about 2^-32 per element.
"""

from __future__ import annotations

import torch

from .prg import PRG

RING_BITS = 64
DEFAULT_FRAC_BITS = 16


def encode(x: torch.Tensor, frac_bits: int = DEFAULT_FRAC_BITS) -> torch.Tensor:
    """Reals to ring elements (float64 on the way, so 2^f scaling is exact)."""
    return torch.round(x.double() * (1 << frac_bits)).long()


def decode(v: torch.Tensor, frac_bits: int = DEFAULT_FRAC_BITS) -> torch.Tensor:
    """Ring elements (as signed int64) back to float32 reals."""
    return (v.double() / (1 << frac_bits)).float()


def share(v: torch.Tensor, prg: PRG | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two additive shares of ``v``: ``v0 + v1 = v`` (mod 2^64); ``v0`` from a fresh AES-CTR stream."""
    v0 = (prg or PRG.fresh()).ring(v.shape)
    return v0, v - v0


def truncate_share(v_share: torch.Tensor, party: int, bits: int) -> torch.Tensor:
    """Local truncation of one party's share by ``bits`` (see the module docstring for the error)."""
    if party == 0:
        return v_share >> bits
    return -((-v_share) >> bits)
