"""Fixed-point numbers on the ring Z_2^64, held as int64 tensors (arithmetic wraps modulo 2^64).

A real ``x`` is encoded as ``round(x * 2^f)`` with ``f`` fractional bits. Additive sharing splits
a ring element ``v`` into ``v0`` uniform and ``v1 = v - v0``; either share alone is uniform and says
nothing about ``v``.

Products of two encodings carry ``2f`` fractional bits and are truncated back to ``f`` with the
dealer's help (:meth:`.core.MPC.truncate_many`: one round, exact up to one unit in the last
place, no failure event for values in range). Local share truncation (SecureML), which needs no
round, fails with probability ``|x| 2^(2f - 64)`` per element by an error of ``2^(64 - f)``: 2^-32
per element for ``|x| = 1`` at f = 16; a BERT-base query truncates ~9e7 elements, so about
``0.02 |x|`` failures per query. It is not used.
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
