"""Openings at their real width: ``N`` values of ``w`` bits travel as ``ceil(N w / 64)`` int64 words.

A 50-bit ring element costs 50 bits on the wire, a masked bit costs one bit (64 per word), as in
Sigma's bit-packed reconstruction. Value ``i`` occupies bits ``[i w, (i + 1) w)`` of the word
stream (little-endian). Values go in groups of 64, which fill exactly ``w`` words, so value ``j``
of every group sits at the same word and bit offset: packing is 64 vector steps over the groups
(values of a group never overlap, so OR-ing them in is exact). Checked on every width 1-64.
"""

from __future__ import annotations

import torch

GROUP = 64


def packed_words(count: int, width: int) -> int:
    return (count * width + 63) // 64


def _slots(width: int):
    """For each position ``j`` of a group: (word, bit offset, whether it spills into the next word)."""
    for j in range(GROUP):
        bit = j * width
        yield j, bit >> 6, bit & 63, (bit & 63) + width > 64


def pack(values: torch.Tensor, width: int) -> torch.Tensor:
    """Low ``width`` bits of each int64 of ``values`` (any shape), concatenated -> int64 words."""
    if not 1 <= width <= 64:
        raise ValueError(f"pack width must be 1..64, got {width}")
    flat = values.reshape(-1)
    count = flat.numel()
    if width == 64:
        return flat.clone()
    groups = (count + GROUP - 1) // GROUP
    v = torch.zeros(groups * GROUP, dtype=torch.int64, device=flat.device)
    v[:count] = flat & ((1 << width) - 1)
    v = v.view(groups, GROUP).T.contiguous()  # (position in group, group): contiguous rows
    out = torch.zeros(width, groups, dtype=torch.int64, device=flat.device)
    for j, word, offset, spill in _slots(width):  # a group's last value ends its last word: no spill out
        out[word] |= v[j] << offset
        if spill:
            out[word + 1] |= v[j] >> (64 - offset)
    return out.T.reshape(-1)[: packed_words(count, width)].clone()


def unpack(words: torch.Tensor, width: int, shape) -> torch.Tensor:
    """Inverse of :func:`pack`: int64 values in ``[0, 2^width)`` (two's complement for width 64)."""
    shape = tuple(shape)
    count = 1
    for d in shape:
        count *= d
    if words.dim() != 1 or words.numel() != packed_words(count, width):
        raise ValueError(f"{words.numel()} words cannot hold {count} values of {width} bits")
    if width == 64:
        return words.clone().view(shape)
    groups = (count + GROUP - 1) // GROUP
    padded = torch.zeros(groups * width, dtype=torch.int64, device=words.device)
    padded[: words.numel()] = words
    padded = padded.view(groups, width).T.contiguous()
    out = torch.empty(GROUP, groups, dtype=torch.int64, device=words.device)
    mask = (1 << width) - 1
    for j, word, offset, spill in _slots(width):
        low = padded[word] >> offset
        if offset:
            low &= (1 << (64 - offset)) - 1  # logical shift
        if spill:
            low |= padded[word + 1] << (64 - offset)
        out[j] = low & mask
    return out.T.reshape(-1)[:count].view(shape)
