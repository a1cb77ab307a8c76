"""Openings at their real width: ``N`` values of ``w`` bits travel as ``ceil(N w / 64)`` int64 words.

A 50-bit ring element costs 50 bits on the wire, a masked bit costs one bit (64 per word), as in
Sigma's bit-packed reconstruction. Value ``i`` occupies bits ``[i w, (i + 1) w)`` of the word
stream (little-endian), so it touches word ``i w // 64`` and possibly the next one; bits of
different values never overlap, which lets packing add contributions instead of OR-ing them.
Packing is exact and checked by tests on every width 1-64.
"""

from __future__ import annotations

import torch


def packed_words(count: int, width: int) -> int:
    return (count * width + 63) // 64


def _layout(count: int, width: int, device):
    start = torch.arange(count, dtype=torch.int64, device=device) * width
    return start >> 6, start & 63


def _low_mask(bits: torch.Tensor) -> torch.Tensor:
    """``2^bits - 1`` for bits in 0..64 (int64, all ones for 64)."""
    ones = torch.full_like(bits, -1)
    return torch.where(bits >= 64, ones, (torch.ones_like(bits) << bits.clamp(max=63)) - 1)


def _shift_right_logical(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return (x >> shift) & _low_mask(64 - shift)


def pack(values: torch.Tensor, width: int) -> torch.Tensor:
    """Low ``width`` bits of each int64 of ``values`` (any shape), concatenated -> int64 words."""
    if not 1 <= width <= 64:
        raise ValueError(f"pack width must be 1..64, got {width}")
    flat = values.reshape(-1)
    if width == 64:
        return flat.clone()
    flat = flat & ((1 << width) - 1)
    word, offset = _layout(flat.numel(), width, flat.device)
    out = torch.zeros(packed_words(flat.numel(), width) + 1, dtype=torch.int64, device=flat.device)
    out.index_add_(0, word, flat << offset)
    spill = offset + width > 64  # the value's high bits continue in the next word
    out.index_add_(0, word[spill] + 1, flat[spill] >> (64 - offset[spill]))
    return out[:-1]


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
    word, offset = _layout(count, width, words.device)
    padded = torch.cat((words, words.new_zeros(1)))
    low = _shift_right_logical(padded[word], offset)
    high = torch.where(offset + width > 64, padded[word + 1] << (64 - offset).clamp(max=63), torch.zeros_like(low))
    return ((low | high) & ((1 << width) - 1)).view(shape)
