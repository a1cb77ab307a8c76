"""The he protocol's CKKS operators against float64 plaintext, over their input ranges.

Parameters: N = 2^15 with 10 levels (128-bit by SEAL's check), refreshes through a client in
this process (the real masked refresh, :mod:`hf_secure.protocols.he.refresh`). Tolerances are
the operators' stated errors plus CKKS noise (about 1e-6 here).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_secure.errors import CorruptKeyError, KeyMismatchError, MissingKeyError, ProgramError, UnknownOptionError
from hf_secure.protocols.he import operators as op
from hf_secure.protocols.he.backend import CKKS, Params
from hf_secure.protocols.he.refresh import Refresher, answer_refresh

PARAMS = Params(2**15, (60,) + (40,) * 10 + (60,), 40)
STRIDE = 64  # fold steps used below: vectors of up to 128 values, 64 slots apart, and 1 apart
STEPS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]  # QuickSum/QuickMax folds


@pytest.fixture(scope="module")
def he():
    client = CKKS.keygen(PARAMS)
    server = CKKS(PARAMS, evaluation_keys=client.evaluation_keys(steps=STEPS))
    refresher = Refresher(server, lambda request: answer_refresh(client, request))
    return client, server, refresher


def encrypt(he, values, level=None):
    client, server, _ = he
    return server.deserialize(client.serialize(client.encrypt(values, level)))


def decrypt(he, ct):
    client, server, _ = he
    return client.decrypt(client.deserialize(server.serialize(ct)))


def test_parameters_are_checked_by_seal():
    assert Params().levels == 19 and Params().slots == 16384
    with pytest.raises(UnknownOptionError, match="128-bit"):
        Params(2**15, (60,) + (40,) * 20 + (60,)).seal_context()
    with pytest.raises(UnknownOptionError):
        Params(2**16)


def test_arithmetic_and_rotation(he):
    client, server, _ = he
    x = np.linspace(-3, 3, PARAMS.slots)
    a = encrypt(he, x)
    prod = server.multiply(a, a)
    total = prod + server.multiply_plain(a, 2.0, scale=prod.scale) - 1.0
    assert np.abs(decrypt(he, total) - (x * x + 2 * x - 1)).max() < 1e-5
    assert np.abs(decrypt(he, server.rotate(a, 4)) - np.roll(x, -4)).max() < 1e-5
    with pytest.raises(MissingKeyError, match="Galois"):
        server.rotate(a, 3)
    with pytest.raises(MissingKeyError, match="secret"):
        server.decrypt(a)


def test_refresh_is_exact_and_masked(he):
    client, server, refresher = he
    x = np.linspace(-100, 100, PARAMS.slots)
    low = server.to_level(encrypt(he, x), 2)
    fresh = refresher(low)
    assert fresh.level == PARAMS.levels
    assert np.abs(decrypt(he, fresh) - x).max() < 1e-6
    seen = []
    refresher.client = lambda request: seen.append(request) or answer_refresh(client, request)
    refresher(low)
    refresher.client = lambda request: answer_refresh(client, request)
    from hf_secure.protocols.he.rns import plaintext_coefficients
    masked = client.deserialize(seen[0][1:])
    u = np.array(plaintext_coefficients(client.context, client.decrypt_plaintext(masked)), dtype=object)
    # the client sees coefficients spread over the whole mask range, not the values (~2^47 here)
    assert max(abs(int(v)) for v in u) > refresher.range // 2
    assert refresher.traffic.rounds >= 2


def test_refresh_refuses_a_mask_that_does_not_fit(he):
    _, server, _ = he
    with pytest.raises(ProgramError, match="cannot hold"):
        Refresher(server, lambda r: r, level=1)


def test_serialized_ciphertexts_are_bound_to_key_params_and_content(he):
    client, server, _ = he
    blob = client.serialize(client.encrypt([1.0, 2.0]))
    other = CKKS.keygen(PARAMS)
    with pytest.raises(KeyMismatchError, match="another secret key"):
        other.deserialize(blob)
    with pytest.raises(KeyMismatchError, match="other CKKS parameters"):
        CKKS.keygen(Params(2**15, (60,) + (40,) * 9 + (60,), 40)).deserialize(blob)
    tampered = bytearray(blob)
    tampered[-100] ^= 1
    with pytest.raises(CorruptKeyError, match="altered"):
        server.deserialize(bytes(tampered))
    with pytest.raises(CorruptKeyError):
        server.deserialize(b"not a ciphertext")
    with pytest.raises(KeyMismatchError):
        CKKS(PARAMS, secret_key=other.secret_key_bytes()).deserialize(blob)
    again = CKKS(PARAMS, secret_key=client.secret_key_bytes())
    assert np.abs(again.decrypt(again.deserialize(blob))[:2] - [1, 2]).max() < 1e-6


def test_sign_on_its_range(he):
    _, server, refresher = he
    x = np.linspace(-1, 1, PARAMS.slots)
    got = decrypt(he, op.sign(server, encrypt(he, x), refresher))
    far = np.abs(x) >= 0.02
    assert np.abs(got - np.sign(x))[far].max() < 2**-10
    assert np.abs(got).max() < 1 + 2**-10  # in between near 0, never beyond +-1


def test_sign_without_levels_or_refresh_fails_closed(he):
    _, server, _ = he
    with pytest.raises(ProgramError, match="no refresh"):
        op.sign(server, encrypt(he, [0.5], level=3))


@pytest.mark.parametrize("name,fn,bound", [
    ("gelu", lambda t: torch.nn.functional.gelu(t), 8.0),
    ("gelu_tanh", lambda t: torch.nn.functional.gelu(t, approximate="tanh"), 8.0),
    ("silu", torch.nn.functional.silu, 12.0),
])
def test_activations_on_their_range(he, name, fn, bound):
    _, server, refresher = he
    x = np.linspace(-bound, bound, PARAMS.slots)
    got = decrypt(he, op.activation(server, encrypt(he, x), name, bound, refresh=refresher))
    assert np.abs(got - fn(torch.tensor(x)).numpy()).max() < 2e-4


@pytest.mark.parametrize("degree", [1, 5, 8, 23, 64])  # 64: giant steps T_8 .. T_64
def test_chebyshev_series_by_baby_and_giant_steps(he, degree):
    _, server, refresher = he
    coeffs = np.random.default_rng(degree).normal(size=degree + 1) / np.arange(1, degree + 2)
    x = np.linspace(-3.0, 5.0, PARAMS.slots)
    got = decrypt(he, op.chebyshev(server, encrypt(he, x), coeffs, -3.0, 5.0, refresher))
    want = np.polynomial.chebyshev.chebval((2 * x - 2.0) / 8.0, coeffs)
    assert np.abs(got - want).max() < 1e-5
    assert op.chebyshev_depth(coeffs) <= 2 + (degree).bit_length()


def test_gelu_by_nexus_pieces(he):
    _, server, refresher = he
    x = np.linspace(-5, 5, PARAMS.slots)
    got = decrypt(he, op.gelu_pieces(server, encrypt(he, x), 5.0, refresher))
    assert np.abs(got - torch.nn.functional.gelu(torch.tensor(x)).numpy()).max() < 2e-3


def test_quick_sum_and_quick_max(he):
    _, server, refresher = he
    rng = np.random.default_rng(0)
    x = rng.uniform(-4, 4, PARAMS.slots)
    # slot s gets the sum of the 128 values s, s + STRIDE, ... (cyclic over all slots)
    want_sum = sum(np.roll(x, -i * STRIDE) for i in range(128))
    got = decrypt(he, op.quick_sum(server, encrypt(he, x), 128, STRIDE))
    assert np.abs(got - want_sum).max() < 1e-4
    x8 = rng.uniform(-1, 1, PARAMS.slots)
    got = decrypt(he, op.quick_max(server, encrypt(he, x8), 8, 1, 1.0, refresher))
    want = np.max(np.stack([np.roll(x8, -i) for i in range(8)]), axis=0)
    # each step's sign is exact beyond gaps of 0.04 (|a - b| / 2 >= 0.02): the max errs by less
    # than the gap times the sign's error near 0
    assert np.abs(got - want).max() < 0.02


def test_argmax_one_hot(he):
    _, server, refresher = he
    rng = np.random.default_rng(1)
    vectors = rng.permutation(np.linspace(-1, 1, 8))[None, :].repeat(PARAMS.slots // 8, 0)
    x = vectors.reshape(-1)
    got = decrypt(he, op.argmax(server, encrypt(he, x), 8, 1, 1.0, gap=2 / 7, refresh=refresher))
    first = got[:8]
    assert np.argmax(first) == np.argmax(x[:8])
    assert abs(first.max() - 1) < 0.01 and np.sort(first)[-2] < 0.01


def test_exp_inverse_and_inverse_sqrt(he):
    _, server, refresher = he
    x = np.linspace(-10, 0, PARAMS.slots)
    got = decrypt(he, op.exp_negative(server, encrypt(he, x), 10.0, refresh=refresher))
    assert np.abs(got - np.exp(x)).max() < 1e-4 + 1e-5  # the plan's tolerance + noise
    y = np.geomspace(1, 128, PARAMS.slots)
    got = decrypt(he, op.inverse(server, encrypt(he, y), 1.0, 128.0, refresh=refresher))
    assert np.max(np.abs(got * y - 1)) < 2**-13
    v = np.geomspace(0.01, 100, PARAMS.slots)
    got = decrypt(he, op.inverse_sqrt(server, encrypt(he, v), 0.01, 100.0, refresh=refresher))
    # the plan's 2^-14 plus fixed point: a = x / high is known to ~2^-40 absolute (1e-8 relative
    # at a = 1e-4), and Newton's 1/sqrt(a) = 100 magnifies that
    assert np.max(np.abs(got * np.sqrt(v) - 1)) < 2**-11


def test_softmax_with_max_subtracted_and_a_mask(he):
    _, server, refresher = he
    rng = np.random.default_rng(2)
    rows = PARAMS.slots // 16
    scores = rng.uniform(-6, 6, (rows, 16))
    keep = np.ones_like(scores)
    keep[:, 12:] = 0  # padded keys
    # interleaved: score j of row t in slot j * rows + t
    got = decrypt(he, op.softmax(server, encrypt(he, scores.T.reshape(-1)), 16, rows, 6.0, refresh=refresher,
                                 keep=keep.T.reshape(-1))).reshape(16, rows).T
    want = torch.softmax(torch.tensor(scores).masked_fill(torch.tensor(keep) == 0, -torch.inf), -1).numpy()
    assert np.abs(got - want).max() < 1e-3
    # keys only in the first 6 positions (a block shorter than the vector): the maximum folds over 8
    keep[:, 6:] = 0
    keep[::3, 3:] = 0  # and some rows with padding inside the span
    got = decrypt(he, op.softmax(server, encrypt(he, scores.T.reshape(-1)), 16, rows, 6.0, refresh=refresher,
                                 keep=keep.T.reshape(-1), span=6)).reshape(16, rows).T
    want = torch.softmax(torch.tensor(scores).masked_fill(torch.tensor(keep) == 0, -torch.inf), -1).numpy()
    assert np.abs(got - want).max() < 1e-3
    with pytest.raises(ProgramError, match="span"):
        op.softmax(server, encrypt(he, scores.T.reshape(-1)), 16, rows, 6.0, refresh=refresher, span=17)


def test_layer_norm_and_rms_norm(he):
    _, server, refresher = he
    rng = np.random.default_rng(3)
    d, tokens = 64, PARAMS.slots // 64
    x = rng.normal(0.5, 2.0, (tokens, d)) * rng.uniform(0.3, 3, (tokens, 1))  # variances 0.4..40
    gamma, beta = rng.uniform(0.5, 1.5, d), rng.normal(0, 0.1, d)
    # feature-major: feature f of token t in slot f * tokens + t
    g, b = np.repeat(gamma, tokens), np.repeat(beta, tokens)
    got = decrypt(he, op.layer_norm(server, encrypt(he, x.T.reshape(-1)), d, tokens, g, b, 1e-5, 0.1, 64.0,
                                    refresher)).reshape(d, tokens).T
    want = torch.nn.functional.layer_norm(torch.tensor(x), (d,), torch.tensor(gamma), torch.tensor(beta), 1e-5)
    assert np.abs(got - want.numpy()).max() < 2e-3
    got = decrypt(he, op.layer_norm(server, encrypt(he, x.T.reshape(-1)), d, tokens, g, None, 1e-6, 0.1, 64.0,
                                    refresher, center=False)).reshape(d, tokens).T
    want = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * gamma
    assert np.abs(got - want).max() < 2e-3


def test_bad_arguments_fail_closed(he):
    client, server, refresher = he
    other = CKKS.keygen(PARAMS)
    with pytest.raises(ProgramError, match="another CKKS context"):
        client.encrypt([1.0]) + other.encrypt([2.0])
    ct = encrypt(he, [1.0])
    for value in (float("nan"), float("inf"), 1e130):
        with pytest.raises(ProgramError):
            server.multiply_plain(ct, value)
    with pytest.raises(ProgramError, match="all-zero"):
        server.multiply_plain(ct, np.zeros(8))
    for options in (dict(security_bits=0), dict(value_bound=float("nan")), dict(value_bound=-1.0), dict(level=99)):
        with pytest.raises(ProgramError):
            Refresher(server, lambda request: request, **options)
    with pytest.raises(ProgramError, match="no key"):
        op.softmax(server, ct, 8, 1, 1.0, refresher, keep=np.zeros(PARAMS.slots))
    for bad in (dict(scale_bits=40.5), dict(coeff_bits=(60, "40", 60)), dict(coeff_bits=(30, 40, 40, 60))):
        with pytest.raises(UnknownOptionError):
            Params(**bad)
