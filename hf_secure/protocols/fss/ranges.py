"""The ranges the fss programs assume, checked on every query: fail closed.

A fixed-point value that leaves its ring wraps to garbage, not to an error. The fss programs
cover most ranges by construction (comparisons run on every bit of their ring, tables clip at
their edges); the norms' are checked here (real units, ``f`` fractional bits on ``Z_2^n``):

=========================================  ===============================  ==================
input                                      range                            check
=========================================  ===============================  ==================
LayerNorm/RMSNorm input, per element       ``|x| < 4096`` (its square at    ``floor(x / 16)`` on
                                           ``2f`` bits and the mean's       24-bit lanes (a
                                           product with the width's         17-level DPF key
                                           24-bit reciprocal stay below     per element): every
                                           ``2^(n-2)``, the truncation's    ``|x|`` in ``(4096,
                                           bound)                           2^27)`` is caught,
                                                                            ``|x| < 4080`` passes
normalised row's sum of squares, per row   ``< 2^(n-2-2f)`` (``2^24`` at    exact, no key: the
                                           ``n = 50``: the same bound)      exponent search
                                                                            already compares it
=========================================  ===============================  ==================

The row check is exact for rows whose sum of squares stays below ``2^(n-2f)`` (``2^26``), i.e.
before it wraps the ring; a row beyond (every element below 4096 but the row's RMS above
``2^13 / sqrt(width)``, 296 at width 768) wraps and may land in range. The element lanes alias
beyond ``2^27``; a product whose truncation failed (an input beyond ``2^(n-2)``, not checked: a
full-width comparison per product would cost about 700 bytes of key per element) is off by a
multiple of ``2^(n-3f)``, ``2^26`` at ``n = 50``, which the lanes see when it reaches a norm.

A program records each check as XOR shares of "out of range" bits (:func:`record`); after the
forward pass :func:`verify_ranges` opens all of them at once under masks (1 bit each, one
round), turns them into additive shares with the dealer's shares of the masks and opens one
count per kind (one round). The servers refuse the query (:class:`~hf_secure.errors.OutOfRangeError`
at the client) if any count is not zero; the session goes on. Leakage: a query in range opens
counts of 0, which the servers knew; a refused one tells them how many values of each kind left
their range.
"""

from __future__ import annotations

import torch

from .core import FSS, SERVER0, Masked, Shares, _meta, wrap

COUNT_BITS = 32  # the ring of the counts
LANE_SHIFT, LANE_BITS = 4, 24  # element lanes: floor(x / 2^(f+4)) on 24 bits
NORM_INPUT_LIMIT = 4096  # real units


def record(ctx: FSS, kind: str, outside: Shares) -> None:
    """Record XOR shares ``outside`` (bits: 1 where a value is out of its range) under ``kind``."""
    ctx.range_checks.append((kind, outside))


def check_norm_input(ctx: FSS, x: Masked) -> None:
    """Record ``|x| >= 4096`` (real units) per element of a norm's input (see the module table)."""
    f = ctx.params.frac_bits
    lanes = x.shift_down(f + LANE_SHIFT).reduce(LANE_BITS)
    # lanes = floor(x / 16) or one more (truncate-reduce); in range: lanes in [-255, 255], so
    # |x| > 4096 always fails (the row check covers x = -4096) and |x| < 4080 always passes
    edge = (NORM_INPUT_LIMIT >> LANE_SHIFT) - 1
    (inside,) = ctx.less_than(lanes, [(edge, 2 * edge + 1)])
    record(ctx, "norm input", _negate(ctx, inside))


def check_below(ctx: FSS, kind: str, below: Shares) -> None:
    """Record the negation of XOR shares ``below`` of an in-range test the program already ran."""
    record(ctx, kind, _negate(ctx, below))


def _negate(ctx: FSS, bits: Shares) -> Shares:
    if ctx.is_dealer or ctx.role != SERVER0:
        return bits
    return Shares(ctx, bits.data ^ 1, 1)


def verify_ranges(ctx: FSS) -> dict[str, int]:
    """Open the number of recorded values out of range per kind: ``{kind: count}``, only nonzero
    counts; empty if none (and always empty on the dealer, which deals the same two rounds' keys)."""
    checks, ctx.range_checks = ctx.range_checks, []
    if not checks:
        return {}
    kinds = list(dict.fromkeys(kind for kind, _ in checks))
    sizes = [bits.data.numel() for _, bits in checks]
    kind_of = torch.cat([torch.full((n,), kinds.index(kind)) for (kind, _), n in zip(checks, sizes)])
    total = sum(sizes)
    if ctx.is_dealer:
        ctx.bits_to_ring(Shares(ctx, _meta((total,)), 1), COUNT_BITS)
        ctx.open(Shares(ctx, _meta((len(kinds),)), COUNT_BITS))
        return {}
    flat = torch.cat([bits.data.reshape(-1) for _, bits in checks])
    outside = ctx.bits_to_ring(Shares(ctx, flat, 1), COUNT_BITS).data
    counts = torch.zeros(len(kinds), dtype=torch.int64, device=outside.device).index_add_(
        0, kind_of.to(outside.device), outside)
    opened_counts = ctx.open(Shares(ctx, wrap(counts, COUNT_BITS), COUNT_BITS))
    return {kind: int(n) for kind, n in zip(kinds, opened_counts.tolist()) if n}
