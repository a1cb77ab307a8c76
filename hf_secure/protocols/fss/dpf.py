"""Distributed point functions with early termination, and comparison from the same keys.

A DPF key pair for a point ``alpha`` in ``[0, 2^n)`` lets party ``b`` compute, for every input
``x``, a bit ``y_b(x)`` with ``y_0(x) xor y_1(x) = [x == alpha]``; either key alone is
pseudorandom and says nothing about ``alpha`` (Boyle-Gilboa-Ishai, CCS 2016, figure 1, with the
Matyas-Meyer-Oseas PRG of :mod:`.aes`).

Early termination: the tree stops ``7`` levels early, and a leaf is a 128-bit block whose bit
``x mod 128`` is the output, so a key is ``16`` bytes of root seed, ``n - 7`` correction words
(16 bytes and 2 control bits each) and one 16-byte leaf correction. For ``n <= 7`` the tree is
just the root and its leaf.

Invariant: on the path to ``alpha`` the two parties' control bits differ (their XOR is 1), off
it seeds and control bits are equal. Hence, walking the path of ``x`` and XOR-ing the control bit
of the *right* sibling wherever ``x`` goes left, plus the leaf's bits above ``x mod 128``, gives
XOR shares of ``[alpha > x]`` (Sigma, PoPETs 2024, section 3.2: comparison from one DPF key,
no DCF key needed).

Every function is vectorised over a batch of ``N`` independent keys (struct of arrays) and runs on
the device of its tensors; results do not depend on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import aes

LEAF_BITS = 7  # 2^7 = 128 outputs per leaf block
MAX_BITS = 63


@dataclass
class DPFKey:
    """One party's keys for ``N`` points of an ``bits``-bit domain.

    Shapes: ``seed (N, 2)``, ``cw_seed (depth, N, 2)``, ``cw_t (depth, N, 2)`` (uint8 bits: left,
    right), ``leaf (N, 2)``; blocks are int64 pairs (:mod:`.aes`). ``depth = max(bits - 7, 0)``.
    """

    party: int
    bits: int
    seed: torch.Tensor
    cw_seed: torch.Tensor
    cw_t: torch.Tensor
    leaf: torch.Tensor

    @property
    def depth(self) -> int:
        return depth_of(self.bits)

    def __len__(self) -> int:
        return self.seed.shape[0]

    @property
    def nbytes(self) -> int:
        """Stored size: seeds and corrections, control bits packed 8 per byte."""
        return 16 * len(self) * (2 + self.depth) + (2 * self.depth * len(self) + 7) // 8

    def repeat(self, times: int) -> "DPFKey":
        """The same keys ``times`` over (key ``j`` of copy ``c`` at ``c N + j``): to evaluate
        several points per key in one pass."""
        return DPFKey(self.party, self.bits, self.seed.repeat(times, 1), self.cw_seed.repeat(1, times, 1),
                      self.cw_t.repeat(1, times, 1), self.leaf.repeat(times, 1))

    def to(self, device) -> "DPFKey":
        return DPFKey(self.party, self.bits, *(t.to(device) for t in (self.seed, self.cw_seed, self.cw_t, self.leaf)))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"seed": self.seed, "cw_seed": self.cw_seed, "cw_t": self.cw_t, "leaf": self.leaf}


def depth_of(bits: int) -> int:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"DPF domains have 1 to {MAX_BITS} bits, got {bits}")
    return max(bits - LEAF_BITS, 0)


def _expand(seed: torch.Tensor, backend: str | None):
    """Seeds ``(..., 2)`` -> left and right child seeds (LSB cleared) and control bits (int64 0/1)."""
    children = []
    for name in "LR":
        child = aes.mmo(seed, name, backend)
        t = child[..., 0] & 1
        child[..., 0] &= ~1
        children += [child, t]
    return children


def _leaf(seed: torch.Tensor, t: torch.Tensor, cw: torch.Tensor, backend: str | None) -> torch.Tensor:
    return aes.mmo(seed, "C", backend) ^ (cw * t.unsqueeze(-1))


def _one_hot_block(offset: torch.Tensor) -> torch.Tensor:
    block = torch.zeros(*offset.shape, 2, dtype=torch.int64, device=offset.device)
    block.scatter_(-1, (offset >> 6).unsqueeze(-1), (1 << (offset & 63)).unsqueeze(-1))
    return block


def _bit_at(block: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    word = block.gather(-1, (offset >> 6).unsqueeze(-1)).squeeze(-1)
    return (word >> (offset & 63)) & 1


def parity(words: torch.Tensor) -> torch.Tensor:
    """Parity of the 64 bits of each int64 (XOR folding; arithmetic shifts only touch high bits)."""
    for shift in (32, 16, 8, 4, 2, 1):
        words = words ^ (words >> shift)
    return words & 1


def _bits_above(offset: torch.Tensor) -> torch.Tensor:
    """128-bit masks with the bits strictly above ``offset`` (0-127) set, as int64 pairs."""
    words = []
    for k in (0, 1):
        shift = offset - 64 * k + 1  # bits of this word at positions >= shift are above offset
        ones = torch.full_like(offset, -1)
        mask = torch.where(shift <= 0, ones, ones << shift.clamp(0, 63))
        words.append(torch.where(shift >= 64, torch.zeros_like(offset), mask))
    return torch.stack(words, dim=-1)


def gen(alpha: torch.Tensor, bits: int, root_seeds: tuple[torch.Tensor, torch.Tensor],
        backend: str | None = None) -> tuple[DPFKey, DPFKey]:
    """Keys for the points ``alpha`` (int64 ``(N,)``, each in ``[0, 2^bits)``).

    ``root_seeds``: two uniform ``(N, 2)`` int64 block tensors from the dealer's cryptographic PRG.
    Raises ValueError for a point outside the domain.
    """
    depth = depth_of(bits)
    alpha = alpha.reshape(-1)
    if alpha.numel() and (alpha.min() < 0 or alpha.max() >= (1 << bits)):
        raise ValueError(f"DPF points must lie in [0, 2^{bits})")
    n = alpha.numel()
    seeds = [root_seeds[0].clone(), root_seeds[1].clone()]
    ts = [torch.zeros(n, dtype=torch.int64, device=alpha.device), torch.ones(n, dtype=torch.int64, device=alpha.device)]
    cw_seed = torch.empty(depth, n, 2, dtype=torch.int64, device=alpha.device)
    cw_t = torch.empty(depth, n, 2, dtype=torch.uint8, device=alpha.device)
    for level in range(depth):
        a = (alpha >> (bits - 1 - level)) & 1
        sl0, tl0, sr0, tr0 = _expand(seeds[0], backend)
        sl1, tl1, sr1, tr1 = _expand(seeds[1], backend)
        go_right = a.bool().unsqueeze(-1)
        lose = torch.where(go_right, sl0, sr0) ^ torch.where(go_right, sl1, sr1)
        t_left = tl0 ^ tl1 ^ a ^ 1
        t_right = tr0 ^ tr1 ^ a
        cw_seed[level] = lose
        cw_t[level, :, 0] = t_left.to(torch.uint8)
        cw_t[level, :, 1] = t_right.to(torch.uint8)
        t_keep = torch.where(a.bool(), t_right, t_left)
        for b, (sl, tl, sr, tr) in enumerate(((sl0, tl0, sr0, tr0), (sl1, tl1, sr1, tr1))):
            keep = torch.where(go_right, sr, sl)
            seeds[b] = keep ^ (lose * ts[b].unsqueeze(-1))
            ts[b] = torch.where(a.bool(), tr, tl) ^ (ts[b] & t_keep)
    zero = torch.zeros(n, 2, dtype=torch.int64, device=alpha.device)
    leaf = _leaf(seeds[0], ts[0], zero, backend) ^ _leaf(seeds[1], ts[1], zero, backend)
    leaf ^= _one_hot_block(alpha & ((1 << LEAF_BITS) - 1))
    return tuple(DPFKey(b, bits, root_seeds[b].clone(), cw_seed, cw_t, leaf) for b in (0, 1))


def _walk(key: DPFKey, x: torch.Tensor, backend: str | None, siblings: bool):
    """Follow the path of ``x``: the leaf's seed and control bit, and (if ``siblings``) the XOR of
    the right siblings' control bits where the path goes left. Per level only the chosen child is
    corrected and cleared (the sibling's control bit is all the comparison needs of it)."""
    seed = key.seed
    t = torch.full((len(key),), key.party, dtype=torch.int64, device=seed.device)
    acc = torch.zeros_like(t)
    cw_t = key.cw_t.long()
    for level in range(key.depth):
        bit = (x >> (key.bits - 1 - level)) & 1
        right = bit.bool()
        left_child, right_child = aes.mmo(seed, "L", backend), aes.mmo(seed, "R", backend)
        tr = (right_child[:, 0] & 1) ^ (t & cw_t[level, :, 1])
        if siblings:
            acc ^= tr & (bit ^ 1)
        tl = (left_child[:, 0] & 1) ^ (t & cw_t[level, :, 0])
        seed = torch.where(right.unsqueeze(-1), right_child, left_child) ^ (key.cw_seed[level] * t.unsqueeze(-1))
        seed[:, 0] &= ~1
        t = torch.where(right, tr, tl)
    return seed, t, acc


def _check_inputs(key: DPFKey, x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1)
    if x.shape[0] != len(key):
        raise ValueError(f"{x.shape[0]} inputs for {len(key)} DPF keys")
    return x & ((1 << key.bits) - 1)


def eval_point(key: DPFKey, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Party ``key.party``'s share of ``[x == alpha]``: int64 bits ``(N,)``. ``x`` is reduced mod 2^bits."""
    x = _check_inputs(key, x)
    seed, t, _ = _walk(key, x, backend, siblings=False)
    return _bit_at(_leaf(seed, t, key.leaf, backend), x & ((1 << LEAF_BITS) - 1))


def eval_greater(key: DPFKey, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Party ``key.party``'s XOR share of ``[alpha > x]``: int64 bits ``(N,)``.

    ``depth`` expansions on the path of ``x``, as for one point, plus one leaf conversion.
    """
    x = _check_inputs(key, x)
    seed, t, acc = _walk(key, x, backend, siblings=True)
    block = _leaf(seed, t, key.leaf, backend) & _bits_above(x & ((1 << LEAF_BITS) - 1))
    return acc ^ parity(block[..., 0] ^ block[..., 1])


def eval_all(key: DPFKey, backend: str | None = None, packed: bool = False) -> torch.Tensor:
    """Party ``key.party``'s shares on the whole domain.

    Returns uint8 bits ``(N, 2^bits)`` (bit ``i`` for input ``i``), or with ``packed`` the leaf
    blocks ``(N, 2^depth, 2)`` int64 (input ``i`` is bit ``i mod 128`` of block ``i // 128``).
    Costs ``2^(depth+1) - 2`` PRG expansions and ``2^depth`` leaf conversions per key.
    """
    seed = key.seed.unsqueeze(1)  # (N, nodes, 2)
    t = torch.full(seed.shape[:2], key.party, dtype=torch.int64, device=seed.device)
    for level in range(key.depth):
        sl, tl, sr, tr = _expand(seed, backend)
        cw = key.cw_seed[level].unsqueeze(1) * t.unsqueeze(-1)
        tl = tl ^ (t & key.cw_t[level, :, 0].long().unsqueeze(1))
        tr = tr ^ (t & key.cw_t[level, :, 1].long().unsqueeze(1))
        seed = torch.stack((sl ^ cw, sr ^ cw), dim=2).flatten(1, 2)  # children in order: 2j, 2j+1
        t = torch.stack((tl, tr), dim=2).flatten(1, 2)
    blocks = _leaf(seed, t, key.leaf.unsqueeze(1), backend)
    if packed:
        return blocks
    return unpack_blocks(blocks)[:, : 1 << key.bits]


def unpack_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """int64 blocks ``(N, k, 2)`` -> uint8 bits ``(N, 128 k)``, bit ``i`` of block ``j`` at ``128 j + i``."""
    data = blocks.contiguous().view(torch.uint8).reshape(blocks.shape[0], -1)  # little-endian bytes
    shifts = torch.arange(8, dtype=torch.uint8, device=blocks.device)
    return ((data.unsqueeze(-1) >> shifts) & 1).reshape(blocks.shape[0], -1)
