"""fss protocols on masked values against plaintext, over their input ranges, edges included.

Every test runs the dealer and both servers in this process (:func:`run_local`): keys really go
through key files in memory, openings through a counted link.
"""

import math

import pytest
import torch

from hf_secure.errors import OutOfRangeError, ProgramError
from hf_secure.protocols.fss import nonlinear as nl
from hf_secure.protocols.fss.local import run_local

F = 12


def enc(v):
    return torch.round(torch.as_tensor(v).double() * (1 << F)).long()


def dec(v):
    return v.double() / (1 << F)


def test_reveal_and_linear_ops_are_exact():
    x, y = torch.randint(-(1 << 40), 1 << 40, (3, 4)), torch.randint(-(1 << 40), 1 << 40, (3, 4))
    out, report = run_local(lambda c, i: [i[0] + i[1], i[0] - i[1], -i[0], i[0].mul_public(3), i[0].add_public(7)], [x, y])
    assert [torch.equal(a, b) for a, b in zip(out, [x + y, x - y, -x, 3 * x, x + 7])] == [True] * 5
    assert report["traffic"][0]["rounds"] == 2 + 5  # the two inputs, then the five test openings


def test_product_and_truncation():
    x, w = torch.randint(-4000, 4000, (5, 7)), torch.randint(-4000, 4000, (7, 3))
    out, _ = run_local(lambda c, i: [c.product(i[0], i[1], torch.matmul), c.product(i[0], i[0])], [x, w])
    assert torch.equal(out[0], x @ w) and torch.equal(out[1], x * x)
    big = torch.cat([torch.randint(-(1 << 47), 1 << 47, (2000,)), torch.tensor([0, -1, 1, (1 << 47) - 1, -(1 << 47)])])
    every = torch.arange(-(1 << 10), 1 << 10)  # every low pattern of every shift below, both signs
    for shift in (1, 7, 8, 12, 24):
        for x in (big, every):
            (t,), report = run_local(lambda c, i: [c.truncate(i[0], shift)], [x])
            assert torch.equal(t, x >> shift), shift  # exact floor, not floor or one more
            assert report["traffic"][0]["rounds"] == 3  # input, the borrow bits, test opening
    for shift in (0, 48):  # beyond what the wrap and the borrow cover on a 50-bit ring
        with pytest.raises(ProgramError, match="shifts by 1 to 47"):
            run_local(lambda c, i: [c.truncate(i[0], shift)], [big])


@pytest.mark.parametrize("bits", [8, 9])
def test_less_than_every_value(bits):
    x = torch.arange(1 << bits)
    tests = [(0, 1), (0, 1 << (bits - 1)), (5, 100), (-3, (1 << bits) - 1), (17, 200)]
    out, _ = run_local(lambda c, i: c.less_than(i[0], tests), [x], input_bits=[bits])
    for (offset, const), got in zip(tests, out):
        assert torch.equal(got & 1, (((x + offset) % (1 << bits)) < const).long()), (offset, const)
    with pytest.raises(ProgramError):
        run_local(lambda c, i: c.less_than(i[0], [(0, 1 << bits)]), [x], input_bits=[bits])


def test_sign_bit_and_mux():
    x = torch.cat([torch.randint(-(1 << 48), 1 << 48, (500,)), torch.tensor([0, -1, 1, (1 << 49) - 1, -(1 << 49)])])

    def program(c, i):
        (d,) = c.reveal(c.sign_bit(i[0]))
        return [d.to_shares(), c.mux([d], i[0], [(0, 0), (1, 0)], 50), c.mux([d], None, [(0, 5), (0, -9)], 50)]

    (d, relu, const), _ = run_local(program, [x])
    assert torch.equal(d & 1, (x >= 0).long())
    assert torch.equal(relu, x.clamp(min=0))
    assert torch.equal(const, torch.where(x >= 0, -9, 5))


@pytest.mark.parametrize("bits", [8, 10])
def test_lookup_every_index(bits):
    table = torch.randint(-(1 << 45), 1 << 45, (1 << bits,))
    x = torch.arange(1 << bits)
    (got,), report = run_local(lambda c, i: c.lookup([(i[0], table)], 50), [x], input_bits=[bits])
    assert torch.equal(got, table)
    assert report["traffic"][0]["rounds"] == 3  # input, lookup, test opening


@pytest.mark.parametrize("name", ["gelu", "gelu_new", "silu"])
def test_activation_against_torch(name):
    x = torch.cat([torch.linspace(-20, 20, 4001), torch.tensor([0.0, 1e-4, -1e-4, 3.99, 4.01, -1e4, 1e4, -2e7, 2e7])])
    ref = {"gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
           "gelu_new": lambda v: torch.nn.functional.gelu(v, approximate="tanh")}[name](x.double())
    (got,), report = run_local(lambda c, i: [nl.activation(c, i[0], name)], [enc(x)])
    assert (dec(got) - ref).abs().max() < 0.01  # 6-bit table grid and stochastic rounding
    assert report["traffic"][0]["rounds"] == 1 + 3 + 1


def test_activation_refuses_unknown():
    with pytest.raises(ValueError):
        run_local(lambda c, i: [nl.activation(c, i[0], "relu6")], [enc(torch.zeros(2))])


def test_softmax_causal_padding_and_extremes():
    torch.manual_seed(0)
    s = torch.randn(2, 2, 16, 16) * 3
    s[0, 0, 3] = torch.linspace(-200, 200, 16)  # far beyond the exponent's clip
    s[0, 1, 5] = 0.0  # a flat row
    keep = torch.tril(torch.ones(16, 16, dtype=torch.bool))
    keep = keep & torch.tensor([True] * 13 + [False] * 3)  # padding too
    (got,), report = run_local(lambda c, i: [nl.softmax(c, i[0], keep)], [enc(s)])
    ref = torch.softmax(s.double().masked_fill(~keep, -math.inf), -1)
    assert (dec(got) - ref).abs().max() < 0.02  # the inverse table's 6-bit grid (Sigma's)
    assert torch.all(got[..., ~keep] == 0)  # dropped positions get exactly 0
    assert report["traffic"][0]["rounds"] == 2 + 2 * 4 + 9


@pytest.mark.parametrize("centered", [True, False])
def test_normalize_against_torch(centered):
    torch.manual_seed(1)
    h = torch.randn(6, 48) * 3 + 1
    h[1] *= 100  # a large row
    h[2] = 0.25  # a constant row
    g, b = torch.randn(48) * 0.5 + 1, torch.randn(48) * 0.1
    (got,), _ = run_local(lambda c, i: [nl.normalize(c, i[0], i[1], i[2] if centered else None, 1e-5, centered)],
                          [enc(h), enc(g), enc(b)])
    if centered:
        ref = torch.nn.functional.layer_norm(h.double(), (48,), g.double(), b.double(), 1e-5)
    else:
        ref = h.double() * torch.rsqrt(h.double().pow(2).mean(-1, keepdim=True) + 1e-5) * g.double()
    err = (dec(got) - ref).abs()
    assert err[[0, 1, 3, 4, 5]].max() < 0.03  # 7-bit mantissa of the rsqrt table
    if centered:
        assert err[2].max() < 0.01  # a constant row normalises to the bias


@pytest.mark.parametrize("centered", [True, False])
def test_normalize_refuses_out_of_range_rows(centered):
    """The norms' assumed ranges (fss.ranges) are checked: refused with a count, not garbage."""
    g, b = torch.ones(16), torch.zeros(16)

    def norm(h):
        return run_local(lambda c, i: [nl.normalize(c, i[0], i[1], i[2] if centered else None, 1e-5, centered)],
                         [enc(h), enc(g), enc(b)])

    ok = torch.zeros(3, 16)
    ok[:, 0], ok[1, 0], ok[2, 1:] = 4000.0, -4000.0, 0.5  # elements < 4080, rows' sums of squares < 2^24
    norm(ok)
    big = ok.clone()
    big[0, 3], big[2, 5], big[2, 6] = 4200.0, -5000.0, 1e6  # three elements beyond 4096, one far beyond
    with pytest.raises(OutOfRangeError, match="norm input: 3 values"):
        norm(big)
    wide = torch.full((2, 16), 1100.0) * torch.tensor([1.0, -1.0] * 8)  # elements in range, sum of squares 1.9e7 > 2^24
    with pytest.raises(OutOfRangeError, match="norm sum of squares: 2 values"):
        norm(wide)
