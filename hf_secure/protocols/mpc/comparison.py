"""Comparison on arithmetic shares: most significant bit, DReLU, ReLU, selection and max.

MSB of ``x`` on ``bits`` bits (``|x| < 2^(bits-1)`` in ring units, after an optional
truncation by ``drop`` bits), with a dealer, in ``ceil(log2(bits - 1)) + 2`` rounds:

1. the dealer shares a uniform ring element ``r`` arithmetically and, for its low ``bits`` bits,
   XOR-wise;
2. the servers open ``c = (x + r) mod 2^bits`` (uniform, since ``r`` is);
3. ``x mod 2^bits = c - r = c + ~r + 1`` is recomputed on XOR shares by a Kogge-Stone carry
   network: ``g = c & ~r`` and ``p = c ^ ~r`` are local (``c`` is public), the carry-in is folded
   into bit 0, and each level ``g ^= p & (g << k)``, ``p &= p << k`` costs one round
   (:func:`_carry_level`: two ANDs that open only ``p`` and ``g``, masked; the last level only
   the first AND); the top bit is ``p[bits-1] ^ carry[bits-2]``;
4. the XOR-shared bit is masked by a dealer bit ``rho``, held XOR-wise and as arithmetic shares
   (integers): the servers open ``z = b ^ rho`` and keep the bit as :class:`SharedBit`
   ``(z, [rho])``, i.e. ``b = z + rho - 2 z rho``. Multiplying a shared value by it
   (:meth:`SharedBit.times`, the multiplexer) opens only the value, masked, and needs no
   truncation: ``b v = z v + (1 - 2z) rho v`` with ``rho v = rho (v - a) + [rho a]``.

Narrow comparisons are packed: with ``bits < 64`` each 64-bit word carries ``64 // (bits + 1)``
elements in lanes of ``bits + 1`` bits (one guard bit absorbs the carry when the two shares of
``c`` are added lane-wise), and every shift of the carry network is masked so that no bit crosses
a lane. A 20-bit comparison moves three elements per word and needs five levels instead of six.

Every AND uses a fresh binary Beaver triple and every opened value is masked by fresh uniform
randomness: the servers learn nothing beyond their output shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .core import MPC, SERVER0, Shared


@dataclass(frozen=True)
class _Lanes:
    """Bit layout of packed comparisons: ``count`` lanes of ``width`` bits, ``bits`` used in each."""

    bits: int

    @property
    def width(self) -> int:
        return 64 if self.bits == 64 else self.bits + 1

    @property
    def count(self) -> int:
        return 64 // self.width

    def repeat(self, pattern: int) -> int:
        """``pattern`` (a value within one lane) copied into every lane, as a signed int64."""
        word = sum(pattern << (j * self.width) for j in range(self.count))
        return word - (1 << 64) if word >= 1 << 63 else word

    def pack(self, values: torch.Tensor) -> torch.Tensor:
        """Flat non-negative ``bits``-bit values -> words (zero-padded to whole words)."""
        if self.count == 1:
            return values.reshape(-1)
        flat = values.reshape(-1)
        pad = (-flat.numel()) % self.count
        flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, self.count)
        shifts = torch.arange(self.count, dtype=torch.int64) * self.width
        return (flat << shifts).sum(-1)

    def unpack_bit(self, words: torch.Tensor, position: int, n: int) -> torch.Tensor:
        """Bit ``position`` of every lane, for the first ``n`` lanes overall."""
        shifts = torch.arange(self.count, dtype=torch.int64) * self.width + position
        return ((words[:, None] >> shifts) & 1).reshape(-1)[:n]

    def low_bits(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.bits == 64 else values & ((1 << self.bits) - 1)


@dataclass(frozen=True)
class SharedBit:
    """A secret bit per element, ``b = z XOR rho``: ``z`` public to the servers (uniform, as it is
    masked by ``rho``), ``rho`` the dealer's random bit, held by each server as an arithmetic
    share of the integer 0/1 (the dealer holds ``rho`` itself). Offline, ``z`` is a meta tensor.
    """

    mpc: MPC
    z: torch.Tensor
    rho: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.z.shape

    def unsqueeze(self, dim: int) -> "SharedBit":
        """The same bits with a new axis of size 1 at ``dim`` (local), to multiply stacked values."""
        return SharedBit(self.mpc, self.z.unsqueeze(dim), self.rho.unsqueeze(dim))

    def flip(self) -> "SharedBit":
        """NOT b (local): ``1 - b = (1 - z) XOR rho``."""
        return SharedBit(self.mpc, 1 - self.z, self.rho)

    def arithmetic(self) -> Shared:
        """Fixed-point shares of ``b = z + rho - 2 z rho`` (local)."""
        mpc = self.mpc
        if mpc.offline:
            return mpc.placeholder(self.shape)
        b = self.rho - 2 * self.z * self.rho + (self.z if mpc.role == SERVER0 else 0)
        return mpc.shared(b * mpc.scale)

    def times(self, v: Shared) -> Shared:
        """``b * v`` (broadcast), one round that opens only ``v - a``; exact, no truncation.

        ``b v = z v + (1 - 2z) rho v`` and ``rho v = rho e + [rho a]`` with ``e = v - a`` public,
        ``a`` a fresh mask and ``[rho a]`` dealt (``rho`` is an integer, so no scaling arises).
        """
        mpc = self.mpc
        mpc.next_request()
        (a,) = mpc.masks(v.shape)
        shape = torch.broadcast_shapes(self.shape, v.shape)
        (rho_a,) = mpc.dealt([self.rho * a] if mpc.is_dealer else None, [shape])
        if mpc.offline:
            return mpc.placeholder(shape)
        e = mpc.open(v - mpc.shared(a))
        rho_v = self.rho * e + rho_a
        return mpc.shared(self.z * v.share + (1 - 2 * self.z) * rho_v)


def msb(x: Shared, bits: int = 64, drop: int = 0) -> SharedBit:
    """The bit ``x < 0`` (fixed point), as a :class:`SharedBit`.

    ``drop`` low bits are first truncated (one round); the rest must satisfy ``|x| < 2^(bits-1)``.
    """
    mpc = x.mpc
    if drop:
        x = x.truncate(drop)
    lanes = _Lanes(bits)
    n = x.share.numel()
    words = -(-n // lanes.count)
    valid = lanes.repeat((1 << bits) - 1)
    top = lanes.repeat(1 << (bits - 1))

    mpc.next_request()
    (r,) = mpc.masks(x.shape)
    mpc.next_request()
    (r_bits,) = mpc.dealt([lanes.pack(lanes.low_bits(r))] if mpc.is_dealer else None, [(words,)], binary=True)
    mpc.next_request()
    (rho,) = mpc.masks((words,), binary=True)
    rho = rho & top
    mpc.next_request()
    (rho_arith,) = mpc.dealt([lanes.unpack_bit(rho, bits - 1, n).view(x.shape)] if mpc.is_dealer else None,
                             [x.shape])

    if mpc.offline:  # replay the circuit on shapes to produce (dealer) or draw (servers) the AND triples
        c = r_bits = torch.empty((words,), dtype=torch.int64, device="meta")
    else:
        mine = lanes.pack(lanes.low_bits(x.share + r))
        c = (mine + mpc.channel.exchange(mine, mpc.peer)) & valid
    lead = mpc.role == SERVER0
    s = r_bits ^ valid if lead else r_bits  # ~r on the used bits, XOR-shared
    g = c & s
    p = s ^ c if lead else s
    g = g ^ (p & lanes.repeat(1))  # carry-in 1
    p_in = p
    shift = 1
    while shift < bits - 1:
        keep = lanes.repeat(((1 << bits) - 1) ^ ((1 << shift) - 1))
        p, g = _carry_level(mpc, p, g, shift, keep, last=2 * shift >= bits - 1)
        shift *= 2
    bit_words = (p_in ^ (g << 1)) & top
    if mpc.offline:
        return SharedBit(mpc, torch.empty(x.shape, dtype=torch.int64, device="meta"), rho_arith)
    masked = bit_words ^ rho
    z_words = masked ^ mpc.channel.exchange(masked, mpc.peer)
    return SharedBit(mpc, lanes.unpack_bit(z_words, bits - 1, n).view(x.shape), rho_arith)


def _carry_level(mpc, p: torch.Tensor, g: torch.Tensor, shift: int, keep: int, last: bool):
    """One level of the carry network on XOR-shared words, in one round:
    ``g ^ (p & up(g))`` and (unless ``last``) ``p & up(p)``, with ``up(v) = (v << shift) & keep``.

    Binary Beaver triples sharing their masks: ``a`` masks ``p`` and ``b`` masks ``g``; ``up`` is
    XOR-linear, so ``up(b)`` and ``up(a)`` mask ``up(g)`` and ``up(p)`` and the servers open only
    ``e = p ^ a`` and ``f = g ^ b`` (half the traffic of two independent ANDs). For ``y`` masked by
    ``m`` with ``o = y ^ m`` public: ``p & y = c ^ (e & m) ^ (a & o) ^ (e & o)`` where the dealer
    shares ``c = a & m`` (the last term on server 0 only).
    """
    mpc.next_request()
    a, b = mpc.masks(p.shape, p.shape, binary=True)

    def up(v):
        return (v << shift) & keep

    products = None
    if mpc.is_dealer:
        products = [a & up(b)] + ([] if last else [a & up(a)])
    cs = mpc.dealt(products, [p.shape] * (1 if last else 2), binary=True)
    if mpc.offline:
        return p, g
    mine = [p ^ a, g ^ b]
    e, f = (m ^ t for m, t in zip(mine, mpc.channel.exchange_many(mine, mpc.peer)))
    lead = mpc.role == SERVER0

    def and_with(c, mask, opened):
        z = c ^ (e & mask) ^ (a & opened)
        return z ^ (e & opened) if lead else z

    g = g ^ and_with(cs[0], up(b), up(f))
    return (None if last else and_with(cs[1], up(a), up(e))), g


def drelu(x: Shared, bits: int = 64, drop: int = 0) -> SharedBit:
    """The bit ``x >= 0`` (see :func:`msb` for ``bits`` and ``drop``)."""
    return msb(x, bits, drop).flip()


def relu(x: Shared) -> Shared:
    """``max(x, 0)``: a 64-bit DReLU and one multiplexer round (exact, no truncation)."""
    return drelu(x).times(x)


def select(condition: SharedBit, if_true: Shared, if_false: Shared) -> Shared:
    """``condition ? if_true : if_false`` (one round)."""
    return if_false + condition.times(if_true - if_false)


def maximum(x: Shared, dim: int = -1, bits: int = 64, drop: int = 0) -> Shared:
    """Max over ``dim`` by a tree of comparisons (ceil(log2 n) levels, keepdim=True)."""
    current = x.mpc.shared(x.share.movedim(dim, -1))
    while current.shape[-1] > 1:
        n = current.shape[-1]
        half = n // 2
        a, b = current[..., :half], current[..., half : 2 * half]
        diff = a - b
        larger = b + drelu(diff, bits, drop).times(diff)
        if n % 2:
            larger = x.mpc.shared(torch.cat([larger.share, current[..., 2 * half :].share], dim=-1))
        current = larger
    return x.mpc.shared(current.share.movedim(-1, dim))


def argmax(x: Shared, bits: int, drop: int) -> Shared:
    """The index of the largest entry along the last dim, as fixed-point shares (``[...]``, the
    last dim removed); nothing else of ``x`` is revealed to anybody.

    A tournament of ``ceil(log2 n)`` levels carrying ``(value, index)`` pairs: at each level the
    left half is compared with the right half, ``left >= right`` is a :class:`SharedBit` ``b``,
    and one multiplexer round on the stacked differences keeps ``right + b (left - right)`` for
    both the value and the index (exact: no truncation). An odd element waits for the next level.
    ``x`` is truncated by ``drop`` bits once, before the first level, so the comparisons run on
    ``bits``-bit lanes without a truncation each: the caller must ensure ``|left - right| <
    2^(bits - 1)`` units of ``2^(drop - f)`` (a range check on ``x``) -- outside it a comparison
    wraps. Entries closer than two such units may be ordered either way (each entry's truncation
    errs by one unit, up or down, independently); ties go to either index.
    Rounds: ``1 + ceil(log2 n) (ceil(log2(bits - 1)) + 3)``.
    """
    mpc = x.mpc
    values = x.truncate(drop) if drop else x
    n = values.shape[-1]
    positions = torch.arange(n, dtype=torch.float64).expand(values.shape)
    index = mpc.shared(torch.zeros(values.shape, dtype=torch.int64, device=values.share.device)).add_public(positions)
    pair = mpc.shared(torch.stack([values.share, index.share], -1))  # [..., n, 2]: value, index
    while n > 1:
        half = n // 2
        left, right = pair[..., :half, :], pair[..., half : 2 * half, :]
        difference = left - right
        larger = right + drelu(difference[..., 0], bits).unsqueeze(-1).times(difference)
        if n % 2:
            larger = mpc.shared(torch.cat([larger.share, pair[..., 2 * half :, :].share], -2))
        pair, n = larger, (n + 1) // 2
    return pair[..., 0, 1]
