"""Comparison on arithmetic shares: most significant bit, DReLU, ReLU, selection and max.

MSB in 8 rounds, with a dealer:

1. the dealer shares a uniform ring element ``r`` arithmetically and, bit by bit, XOR-wise;
2. the servers open ``c = x + r`` (perfectly hiding: ``r`` is uniform on the whole ring);
3. ``x = c - r = c + ~r + 1`` is recomputed on XOR shares with a Kogge-Stone carry network:
   ``g = c & ~r``, ``p = c ^ ~r`` are local (``c`` is public), the carry-in is folded into bit 0,
   and six levels ``g ^= p & (g << k)``, ``p &= p << k`` (k = 1..32) cost one round of two ANDs
   each; the sum's top bit is ``p[63] ^ g[62]``;
4. the XOR-shared bit becomes arithmetic with a dealer bit ``rho`` held both ways: open
   ``z = b ^ rho`` and take ``b = z + rho - 2 z rho``.

Every AND uses a fresh binary Beaver triple, every opened value is masked by fresh uniform
randomness, so the servers learn nothing beyond the output shares.
"""

from __future__ import annotations

import torch

from .core import SERVER0, Shared

_KOGGE_STONE = (1, 2, 4, 8, 16, 32)


def msb(x: Shared) -> Shared:
    """Shares of 1 where ``x < 0`` and 0 elsewhere (as fixed-point values)."""
    mpc = x.mpc
    shape = x.shape
    mpc.next_request()
    (r,) = mpc.masks(shape)
    mpc.next_request()
    (r_bits,) = mpc.dealt([r] if mpc.is_dealer else None, [shape], binary=True)
    mpc.next_request()
    (rho,) = mpc.masks(shape, binary=True)
    rho = rho & 1
    mpc.next_request()
    (rho_arith,) = mpc.dealt([rho] if mpc.is_dealer else None, [shape])

    if mpc.is_dealer:  # the dealer replays the circuit on shapes to produce its AND triples
        c = r_bits = torch.empty(shape, dtype=torch.int64, device="meta")
    else:
        c = mpc.open(x + mpc.shared(r))
    lead = mpc.role == SERVER0
    s = ~r_bits if lead else r_bits  # ~r, XOR-shared: one party flips its share
    g = c & s
    p = s ^ c if lead else s
    g = g ^ (p & 1)  # carry-in 1
    p_in = p
    for shift in _KOGGE_STONE:
        carried, p = mpc.ands([(p, g << shift), (p, p << shift)])
        g = g ^ carried
    bit = ((p_in ^ (g << 1)) >> 63) & 1
    if mpc.is_dealer:
        return mpc.placeholder(shape)
    masked = bit ^ rho
    z = masked ^ mpc.channel.exchange(masked, mpc.peer)
    arith = rho_arith - 2 * z * rho_arith + (z if lead else 0)
    return mpc.shared(arith * mpc.scale)


def drelu(x: Shared) -> Shared:
    """Shares of ``[x >= 0]``."""
    return (-msb(x)).add_public(1.0)


def relu(x: Shared) -> Shared:
    return x * drelu(x)


def select(condition: Shared, if_true: Shared, if_false: Shared) -> Shared:
    """``condition ? if_true : if_false`` for a shared 0/1 ``condition`` (one product)."""
    return if_false + condition * (if_true - if_false)


def maximum(x: Shared, dim: int = -1) -> Shared:
    """Max over ``dim`` by a tree of comparisons (ceil(log2 n) levels, keepdim=True)."""
    values = x.share.movedim(dim, -1)
    current = x.mpc.shared(values)
    while current.shape[-1] > 1:
        n = current.shape[-1]
        half = n // 2
        a, b = current[..., :half], current[..., half : 2 * half]
        diff = a - b
        larger = b + drelu(diff) * diff
        if n % 2:
            larger = x.mpc.shared(torch.cat([larger.share, current[..., 2 * half :].share], dim=-1))
        current = larger
    return x.mpc.shared(current.share.movedim(-1, dim))
