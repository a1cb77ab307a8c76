"""Comparison-based protocols on shares: MSB/DReLU/ReLU, max, SecFormer GeLU, series SiLU, exact-style softmax."""

from __future__ import annotations

import torch

from hf_secure.protocols.mpc.comparison import argmax, drelu, maximum, msb, relu, select
from hf_secure.modeling.approximate import SecFormerGELU, SeriesSiLU
from hf_secure.protocols.mpc.nonlinear import gelu, silu, softmax
from hf_secure.protocols.mpc.run import secure_eval

CAUSAL = torch.tril(torch.ones(6, 6, dtype=torch.int64))


def _program(mpc, x, a, b, rows, g, scores):
    return [msb(x).arithmetic(), drelu(x).arithmetic(), relu(x), select(drelu(a - b), a, b), maximum(rows), gelu(g),
            silu(g.mul_public(2.0)),
            softmax(scores, CAUSAL)]


def test_comparisons_match_plaintext():
    gen = torch.Generator().manual_seed(0)
    # edges: zero, one unit in the last place either side, large magnitudes of both signs
    x = torch.tensor([0.0, 2**-16, -(2**-16), 1e-3, -1e-3, 5.0, -5.0, 30000.0, -30000.0, 1e6, -1e6])
    a, b = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    rows = torch.randn(3, 7, generator=gen) * 10
    g = torch.cat([torch.linspace(-8, 8, 161), torch.tensor([-4.0 - 2**-16, 4.0 - 2**-16, 20.0, -20.0])])
    scores = torch.randn(2, 6, 6, generator=gen) * 3
    out, report = secure_eval(_program, [x, a, b, rows, g, scores])
    got_msb, got_drelu, got_relu, got_select, got_max, got_gelu, got_silu, got_softmax = out

    assert torch.equal(got_msb, (x < 0).float())
    assert torch.equal(got_drelu, (x >= 0).float())
    assert (got_relu - x.relu()).abs().max() < 1e-3
    assert (got_select - torch.maximum(a, b)).abs().max() < 1e-3
    assert (got_max - rows.max(-1, keepdim=True).values).abs().max() < 1e-3
    # SecFormer's erf series errs by up to ~0.036 on [-2.5, 2.5] (u = x / sqrt 2); GeLU scales it by
    # x / 2, so 0.058 at x ~ 3.5; outside the segment erf is exact (+-1)
    assert (got_gelu - torch.nn.functional.gelu(g)).abs().max() < 0.065
    # the series tanh errs by <= 6e-4 on [-8, 8]; SiLU by <= 2.7e-3 (segment edges at |x| = 8 included)
    assert (got_silu - torch.nn.functional.silu(2 * g)).abs().max() < 5e-3
    # against the plaintext approximations the checkpoints run with: fixed-point error only, except
    # within 2^-3 of a segment edge (the segment tests keep 4 fractional bits, +-1 unit after the
    # truncation), where the comparison may pick the neighbouring segment: an error of the
    # jump there (bounded by the GeLU/SiLU tolerances above)
    gelu_off_edge = ((g / 2**0.5).abs() - 2.5).abs() > 2**-3
    assert gelu_off_edge.sum() > 150 and (~gelu_off_edge).sum() >= 2  # points on both sides of the edges
    assert (got_gelu - SecFormerGELU()(g))[gelu_off_edge].abs().max() < 2e-3
    silu_off_edge = ((2 * g).abs() - 8).abs() > 2**-3
    assert (got_silu - SeriesSiLU()(2 * g))[silu_off_edge].abs().max() < 2e-3
    expected = torch.softmax(scores.masked_fill(CAUSAL == 0, float("-inf")), -1)
    assert (got_softmax - expected).abs().max() < 1e-2
    assert report["SERVER0"]["stats"]["online"]["rounds"] > 0


def _narrow(mpc, x):
    return [bit.arithmetic() for bit in (msb(x, 20, 0), msb(x, 20, 10), msb(x, 12, 0), drelu(x, 33, 4))]


def test_packed_narrow_comparisons():
    """Lanes of 21, 13 and 34 bits (3, 4 and 1 per word), with and without a truncation first."""
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.tensor([0.0, 2**-16, -(2**-16), 2**-6, -(2**-6), 7.9, -7.9, -0.03]),
                   (torch.rand(37, generator=gen) - 0.5) * 15])
    (m20, m20d, m12, d33), _ = secure_eval(_narrow, [x])
    assert torch.equal(m20, (x < 0).float())
    wide = x.abs() >= 2**-6  # after dropping 10 of 16 fractional bits, tiny values read as 0 or -2^-6
    assert torch.equal(m20d[wide], (x < 0).float()[wide])
    small = x.abs() < 2 ** (11 - 16)  # 12 bits: |x| < 2^11 ring units
    assert torch.equal(m12[small], (x < 0).float()[small])
    assert torch.equal(d33[wide], (x >= 0).float()[wide])


def _argmax(mpc, rows, wide):
    return [argmax(rows, 20, 8), argmax(wide, 20, 8)]


def test_argmax_carries_the_index_through_the_tournament():
    """Odd lengths (an element waits a level), one element, negative rows, a 2048-token vocabulary;
    entries at least 2^-7 apart (the comparison keeps 8 fractional bits), so the argmax is unique."""
    gen = torch.Generator().manual_seed(1)
    rows = torch.randperm(7 * 13, generator=gen).view(7, 13).float() / 64 - 1.0  # steps of 2^-6
    rows[3] -= 500.0
    rows[5, 12] = rows[5].max() + 2**-6  # the last of 13 waits at the first level, then wins
    wide = torch.randn(2, 3, 2048, generator=gen) * 40
    wide[0, 0, 2047] = wide.max() + 2**-7
    (got_rows, got_wide), report = secure_eval(_argmax, [rows, wide])
    assert got_rows.shape == (7,) and got_wide.shape == (2, 3)
    assert torch.equal(got_rows.round().long(), rows.argmax(-1))
    assert torch.equal(got_wide.round().long(), wide.argmax(-1))
    assert (got_wide - got_wide.round()).abs().max() == 0  # indices are exact: no truncation on them
    # per argmax one truncation, then per level (4 for 13, 11 for 2048) a 20-bit comparison (7) and a multiplexer
    assert report["SERVER0"]["stats"]["online"]["rounds"] == 2 + (4 + 11) * 8


def _one(mpc, x):
    return [argmax(x, 20, 8)]


def test_argmax_of_one_element_is_zero():
    (got,), _ = secure_eval(_one, [torch.tensor([[3.5], [-2.0]])])
    assert got.tolist() == [0.0, 0.0]
