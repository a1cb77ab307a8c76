"""NEXUS's compressed ciphertext-plaintext matrix product against float64, N = 2^13 (128-bit)."""

from __future__ import annotations

import numpy as np
import pytest

from hf_secure.errors import MissingKeyError, ProgramError
from hf_secure.protocols.he import linear
from hf_secure.protocols.he.backend import CKKS, Params
from hf_secure.protocols.he.rns import plaintext_coefficients
from tenseal import sealapi as seal

PARAMS = Params(2**13, (60, 40, 60), 40)


def test_coefficient_encoding_matches_seal():
    client = CKKS.keygen(PARAMS)
    z = np.random.default_rng(0).normal(size=PARAMS.slots)
    pt = seal.Plaintext()
    client.encoder.encode(z.tolist(), client.parms_id(1), 2.0**40, pt)
    seal_coeffs = np.array(plaintext_coefficients(client.context, pt), dtype=float) / 2**40
    assert np.abs(linear.encode_coefficients(z, PARAMS.poly_degree) - seal_coeffs).max() < 1e-9


@pytest.mark.parametrize("m", [16, 64])
def test_compressed_matmul(m):
    rng = np.random.default_rng(m)
    n, p = 300, 200  # rows of X spread over several ciphertexts, the last one partly filled
    x, w = rng.uniform(-1, 1, (n, m)), rng.uniform(-1, 1, (p, n))
    count = PARAMS.poly_degree // (2 * m)
    client = CKKS.keygen(PARAMS)
    server = CKKS(PARAMS, evaluation_keys=client.evaluation_keys(elements=linear.expansion_elements(client, count)))
    upload = linear.pack_rows(client, x, level=1)
    assert len(upload) == -(-n // count)
    rows = [r for blob in upload for r in linear.expand(server, server.deserialize(blob), count)][:n]
    outs = linear.matmul_expanded(server, rows, w, m)
    assert all(o.level == 0 for o in outs)  # to the client at the lowest level
    got = linear.unpack_rows([client.decrypt(client.deserialize(server.serialize(o))) for o in outs], p, m)
    assert np.abs(got - w @ x).max() < 1e-5


def test_expansion_needs_its_keys_and_a_power_of_two():
    client = CKKS.keygen(PARAMS)
    server = CKKS(PARAMS, evaluation_keys=client.evaluation_keys())
    ct = server.deserialize(linear.pack_rows(client, np.ones((4, 64)))[0])
    with pytest.raises(MissingKeyError):
        linear.expand(server, ct, 64)
    with pytest.raises(ProgramError):
        linear.expand(server, ct, 48)
    with pytest.raises(ProgramError):
        linear.pack_rows(client, np.ones((4, 48)))


def test_slot_linear_on_the_model_layout():
    from hf_secure.protocols.he.layout import Layout

    params = Params(2**14, (60,) + (40,) * 4 + (60,), 40)
    lin, lout = Layout(params.slots, 64, 200, 16), Layout(params.slots, 64, 150, 16)  # 2 ciphertexts each
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(64, 200)), rng.normal(size=(200, 150)) * 0.1, rng.normal(size=150)
    client = CKKS.keygen(params)
    server = CKKS(params, evaluation_keys=client.evaluation_keys(steps=linear.SlotLinear.steps(lin)))
    cts = [server.deserialize(client.serialize(client.encrypt(v, level=1))) for v in lin.pack(x)]
    outs = linear.SlotLinear(server, w, b, lin, lout)(cts)
    assert all(o.level == 0 for o in outs)
    got = lout.unpack([client.decrypt(client.deserialize(server.serialize(o))) for o in outs])
    assert np.abs(got - (x @ w + b)).max() < 1e-4
    assert server.costs.rotations == 2 * 15 + 2 * 7  # 15 baby steps per input, 7 giant per output (per_ct 128)
