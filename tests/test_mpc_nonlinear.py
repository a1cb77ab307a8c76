"""SecFormer / MPCFormer nonlinearities on shares against plaintext, over their input ranges."""

from __future__ import annotations

import functools
import math

import torch

from hf_secure.protocols.mpc.nonlinear import (
    ERF_PERIOD,
    ERF_SINE_COEFFS,
    erf_series,
    inv_sqrt,
    masked_phase,
    layer_norm,
    quad_gelu,
    reciprocal,
    rms_norm,
    sine_series,
    two_quad_softmax,
)
from hf_secure.protocols.mpc.run import secure_eval

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def _program(mpc, x_wide, x_erf, v, w, gamma, beta, scores):
    return [
        sine_series(x_wide, ERF_SINE_COEFFS, 32),
        erf_series(x_erf),
        inv_sqrt(v, bound=4.0),
        reciprocal(v, 4e-3, 8.0),
        layer_norm(w, gamma, beta, eps=1e-5, var_bound=8.0),
        rms_norm(w, gamma, eps=1e-6, ms_bound=8.0),
        quad_gelu(x_erf),
        two_quad_softmax(scores, MASK),
    ]


def _sine_reference(x, period):
    return sum(b * torch.sin(2 * k * math.pi * x.double() / period) for k, b in enumerate(ERF_SINE_COEFFS, 1)).float()


def test_nonlinearities_match_plaintext():
    gen = torch.Generator().manual_seed(0)
    x_wide = torch.linspace(-1000, 1000, 301)  # far outside one period: exercises the modular reduction (exact)
    x_erf = torch.linspace(-2.5, 2.5, 201)
    v = torch.cat([torch.linspace(0.05, 7.9, 100), torch.tensor([0.01, 1e-3 * 4])])  # (0, 2 * bound)
    w = torch.randn(3, 16, generator=gen) * 2 + 0.5
    gamma, beta = torch.rand(16, generator=gen) + 0.5, torch.rand(16, generator=gen) - 0.5
    scores = torch.randn(2, 4, generator=gen) * 2
    (sine, erf, rsqrt, recip, ln, rms, qgelu, softmax), report = secure_eval(
        _program, [x_wide, x_erf, v, w, gamma, beta, scores])

    assert (sine - _sine_reference(x_wide, 32)).abs().max() < 2e-3
    assert (erf - torch.erf(x_erf)).abs().max() < 0.04  # SecFormer's series: ~0.036 on [-2.5, 2.5]
    # Goldschmidt over the whole deflated range, v / bound in [1e-3, 2), smallest values included
    assert ((rsqrt - v.rsqrt()) / v.rsqrt()).abs().max() < 1e-2
    assert ((recip - 1 / v) * v).abs().max() < 1e-2
    ref_ln = torch.nn.functional.layer_norm(w, (16,), gamma, beta, eps=1e-5)
    assert (ln - ref_ln).abs().max() < 2e-2
    ref_rms = w * torch.rsqrt(w.pow(2).mean(-1, keepdim=True) + 1e-6) * gamma
    assert (rms - ref_rms).abs().max() < 2e-2
    assert (qgelu - (0.125 * x_erf**2 + 0.25 * x_erf + 0.5)).abs().max() < 1e-3
    q = (scores + 5) ** 2 * MASK
    assert (softmax - q / q.sum(-1, keepdim=True)).abs().max() < 1e-2
    assert report["DEALER"]["offline_bytes"] > 0


def _erf_period(mpc, x):
    return [sine_series(x, ERF_SINE_COEFFS, ERF_PERIOD)]


def test_sine_series_of_a_period_that_is_not_a_power_of_two():
    """SecFormer's period 20: the input is scaled to period 32 first; accurate over several periods."""
    x = torch.linspace(-45, 45, 361)
    (sine,), _ = secure_eval(_erf_period, [x])
    assert (sine - _sine_reference(x, ERF_PERIOD)).abs().max() < 2e-3


def _phases(mpc, x):
    d, _ = masked_phase(x, 1 << 21, 1)
    if mpc.offline:
        return [mpc.placeholder(x.shape)]
    return [mpc.shared(d if mpc.role == 0 else torch.zeros_like(d))]  # what the servers opened, to the test


def test_the_sine_protocol_opens_a_uniform_value_whatever_the_input():
    """The opened d = (x - t) mod 2^21 for x = 0 and for x = +-30000 (far beyond any range): both
    samples uniform on [0, 2^21) and alike (chi-square over 64 bins; p > 1e-4 unless broken)."""
    n = 1 << 14
    x = torch.cat([torch.zeros(n), torch.full((n // 2,), 30000.0), torch.full((n // 2,), -30000.0)])
    (d,), _ = secure_eval(_phases, [x])
    d = (d.double() * 2**16).round().long()
    assert d.min() >= 0 and d.max() < 1 << 21
    expected = n / 64
    for sample in (d[:n], d[n:]):
        counts = torch.bincount(sample >> 15, minlength=64).double()
        assert ((counts - expected) ** 2 / expected).sum() < 130  # chi-square, 63 d.o.f.: p ~ 1e-6
    # the two samples: same histogram up to sampling noise
    a, b = (torch.bincount(s >> 15, minlength=64).double() for s in (d[:n], d[n:]))
    assert (((a - b) ** 2) / (a + b)).sum() < 130


def _wide(mpc, v_sqrt, v_recip, scores):
    return [inv_sqrt(v_sqrt, bound=37.0), reciprocal(v_recip, 0.85, 1.15 * 1024), two_quad_softmax(scores, torch.ones(1, dtype=torch.int64))]


def test_goldschmidt_over_wide_ranges():
    """Deflated inputs from 1e-4 of the bound to 2x it (and a little beyond), a softmax row sum of a
    1024-token context, a 2Quad softmax over 64 scores: fixed-point error stays small everywhere."""
    gen = torch.Generator().manual_seed(5)
    v_sqrt = torch.cat([torch.logspace(math.log10(37e-4), math.log10(74.0), 60), torch.tensor([80.0, 90.0, 92.4])])
    v_recip = torch.cat([torch.logspace(0, math.log10(1.15 * 1024), 60), torch.tensor([0.85, 1200.0])])
    scores = torch.randn(3, 64, generator=gen) * 3
    (rsqrt, recip, quad), _ = secure_eval(_wide, [v_sqrt, v_recip, scores])
    assert ((rsqrt - v_sqrt.rsqrt()) / v_sqrt.rsqrt()).abs().max() < 5e-3
    # relative 5e-3, or a few units of the output's fixed point (1/1000 is only 66 units of 2^-16)
    assert ((recip - 1 / v_recip).abs() < 5e-3 / v_recip + 2**-14).all()
    q = (scores + 5) ** 2
    assert (quad - q / q.sum(-1, keepdim=True)).abs().max() < 1e-3


def _rms(mpc, w, gamma, bound):
    return [rms_norm(w, gamma, eps=1e-6, ms_bound=bound)]


def test_rms_norm_of_rows_with_a_huge_activation_never_fails():
    """Issue 10: with local truncation an RMSNorm over 4000 rows, each with one entry of 2622 (the
    magnitude of Llama-2-7B's largest activations), corrupted ~26 rows by ~3.6e9. Now: every row right."""
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(4000, 16, generator=gen)
    w[torch.arange(4000), torch.randint(0, 16, (4000,), generator=gen)] = 2622.0 * torch.sign(torch.randn(4000, generator=gen))
    gamma = torch.rand(16, generator=gen) + 0.5
    ms = w.pow(2).mean(-1)
    (got,), _ = secure_eval(functools.partial(_rms, bound=ms.max().item()), [w, gamma])
    expected = w * torch.rsqrt(ms.view(-1, 1) + 1e-6) * gamma
    row_error = (got - expected).abs().amax(-1)
    # No row corrupted (a failed truncation was off by ~1e9). The error left is fixed-point
    # precision: 1/sqrt(4.3e5) = 1.5e-3 is ~100 units at 16 fractional bits, 1% of outputs up to ~6.
    assert row_error.max() < 0.1 and row_error.median() < 2e-3
