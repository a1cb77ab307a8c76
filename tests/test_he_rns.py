"""Exact CKKS plaintext coefficients (hf_secure.protocols.he.rns) against SEAL itself."""

from __future__ import annotations

import cmath
import math
import random

import pytest

pytest.importorskip("tenseal")
from tenseal import sealapi  # noqa: E402

from hf_secure.protocols.he.rns import plaintext_coefficients, plaintext_from_coefficients  # noqa: E402

N = 2**13
SCALE = 2.0**40
NOISE = 2**10  # fresh public-key encryption noise per coefficient at N = 2^13 (measured < 2^7)


class Keys:
    """A CKKS context with data levels of 4, 3, 2 and 1 primes (50+40+40+40 bits), and its tools."""

    def __init__(self):
        parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(N)
        parms.set_coeff_modulus(sealapi.CoeffModulus.Create(N, [50, 40, 40, 40, 40]))
        self.context = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
        assert self.context.parameters_set()
        keygen = sealapi.KeyGenerator(self.context)
        public_key = sealapi.PublicKey()
        keygen.create_public_key(public_key)
        self.encryptor = sealapi.Encryptor(self.context, public_key)
        self.encryptor.set_secret_key(keygen.secret_key())
        self.decryptor = sealapi.Decryptor(self.context, keygen.secret_key())
        self.evaluator = sealapi.Evaluator(self.context)
        self.encoder = sealapi.CKKSEncoder(self.context)
        self.levels = []  # (parms_id, q), top level first
        data = self.context.first_context_data()
        while data is not None:
            q = 1
            for m in data.parms().coeff_modulus():
                q *= m.value()
            self.levels.append((data.parms_id(), q))
            data = data.next_context_data()

    def level(self, primes: int):
        return self.levels[len(self.levels) - primes]

    def encrypt(self, pt):
        ct = sealapi.Ciphertext()
        self.encryptor.encrypt(pt, ct)
        return ct

    def decrypt(self, ct) -> list[int]:
        pt = sealapi.Plaintext()
        self.decryptor.decrypt(ct, pt)
        return plaintext_coefficients(self.context, pt)


@pytest.fixture(scope="module")
def keys():
    return Keys()


def uniform(rng: random.Random, bound: int) -> list[int]:
    """N integers uniform in [-bound, bound]."""
    return [rng.randint(-bound, bound) for _ in range(N)]


def assert_close(got: list[int], want: list[int], bound: int = NOISE):
    assert len(got) == len(want)
    assert max(abs(g - w) for g, w in zip(got, want)) < bound


@pytest.mark.parametrize("primes", [4, 3, 2, 1])
def test_round_trip_is_exact(keys, primes):
    parms_id, q = keys.level(primes)
    coeffs = uniform(random.Random(primes), q // 2)
    coeffs[:4] = [q // 2, -(q // 2), 0, -1]  # the extremes (q is odd)
    pt = plaintext_from_coefficients(keys.context, coeffs, parms_id, SCALE)
    assert pt.is_ntt_form()
    assert pt.parms_id() == parms_id
    assert pt.scale == SCALE
    assert pt.coeff_count() == primes * N
    assert sealapi.is_valid_for(pt, keys.context)
    assert plaintext_coefficients(keys.context, pt) == coeffs


@pytest.mark.parametrize("primes", [4, 3, 1])
def test_matches_ckks_encoder(keys, primes):
    """SEAL puts slot j at the root zeta^(3^j mod 2N), zeta = exp(i pi / N): the polynomial
    2^30 X^5 is the slot vector 2^30 zeta^(5 * 3^j). (A constant would not catch NTT tables
    that differ from SEAL's, since its NTT is constant for every root.)"""
    parms_id, _ = keys.level(primes)
    coeffs = [0] * N
    coeffs[5] = 2**30
    slots = [cmath.exp(1j * math.pi * (5 * pow(3, j, 2 * N) % (2 * N)) / N) for j in range(N // 2)]

    encoded = sealapi.Plaintext()
    keys.encoder.encode(slots, parms_id, 2.0**30, encoded)
    assert_close(plaintext_coefficients(keys.context, encoded), coeffs, bound=2)

    built = plaintext_from_coefficients(keys.context, coeffs, parms_id, 2.0**30)
    assert keys.encoder.decode_complex(built) == pytest.approx(slots, abs=1e-9)


def test_encrypt_decrypt_gives_coefficients_plus_small_noise(keys):
    parms_id, q = keys.level(3)
    coeffs = uniform(random.Random(1), q // 2 - NOISE)
    pt = plaintext_from_coefficients(keys.context, coeffs, parms_id, SCALE)
    assert_close(keys.decrypt(keys.encrypt(pt)), coeffs)
    symmetric = sealapi.Ciphertext()
    keys.encryptor.encrypt_symmetric(pt, symmetric)
    assert_close(keys.decrypt(symmetric), coeffs, bound=2**5)


def test_add_plain_adds_coefficients(keys):
    parms_id, q = keys.level(3)
    rng = random.Random(2)
    c1, c2 = uniform(rng, q // 4), uniform(rng, q // 4)
    ct = keys.encrypt(plaintext_from_coefficients(keys.context, c2, parms_id, SCALE))
    keys.evaluator.add_plain_inplace(ct, plaintext_from_coefficients(keys.context, c1, parms_id, SCALE))
    assert_close(keys.decrypt(ct), [a + b for a, b in zip(c1, c2)])


def test_mod_switch_keeps_small_coefficients(keys):
    """CKKS mod switching drops primes without dividing: values with |c| < q_small/2 survive."""
    top_id, _ = keys.level(4)
    small_id, q_small = keys.level(3)
    coeffs = uniform(random.Random(3), q_small // 2 - NOISE)
    ct = keys.encrypt(plaintext_from_coefficients(keys.context, coeffs, top_id, SCALE))
    keys.evaluator.mod_switch_to_inplace(ct, small_id)
    assert ct.parms_id() == small_id
    assert_close(keys.decrypt(ct), coeffs)


def test_refresh_through_the_client(keys):
    """Mask at 3 primes, exact decryption, re-encryption at the top level, unmask: x survives."""
    low_id, _ = keys.level(3)
    top_id, _ = keys.level(4)
    x = [random.Random(4).uniform(-4, 4) for _ in range(N // 2)]
    encoded = sealapi.Plaintext()
    keys.encoder.encode(x, low_id, SCALE, encoded)
    ct = keys.encrypt(encoded)

    mask = uniform(random.Random(5), 2**105)  # server
    keys.evaluator.add_plain_inplace(ct, plaintext_from_coefficients(keys.context, mask, low_id, ct.scale))
    masked = keys.decrypt(ct)  # client: m + e + r, exactly
    fresh = keys.encrypt(plaintext_from_coefficients(keys.context, masked, top_id, ct.scale))
    top_mask = plaintext_from_coefficients(keys.context, mask, top_id, fresh.scale)
    keys.evaluator.sub_plain_inplace(fresh, top_mask)

    assert fresh.parms_id() == top_id
    out = sealapi.Plaintext()
    keys.decryptor.decrypt(fresh, out)
    assert keys.encoder.decode_double(out) == pytest.approx(x, abs=1e-6)


def test_out_of_range_coefficients_are_rejected(keys):
    parms_id, q = keys.level(3)
    zeros = [0] * N
    for bad in (q // 2 + 1, -(q // 2) - 1, q):
        with pytest.raises(ValueError, match="out of range"):
            plaintext_from_coefficients(keys.context, [bad] + zeros[1:], parms_id, SCALE)


def test_bad_arguments_are_rejected(keys):
    parms_id, _ = keys.level(3)
    with pytest.raises(ValueError, match="coefficients"):
        plaintext_from_coefficients(keys.context, [0] * (N - 1), parms_id, SCALE)
    with pytest.raises(ValueError, match="parms_id"):
        plaintext_from_coefficients(keys.context, [0] * N, [1, 2, 3, 4], SCALE)
    with pytest.raises(TypeError):
        plaintext_from_coefficients(keys.context, [0.5] + [0] * (N - 1), parms_id, SCALE)
    with pytest.raises(ValueError, match="NTT"):
        plaintext_coefficients(keys.context, sealapi.Plaintext("1x^1 + 3"))
