"""RNS-CKKS through Microsoft SEAL 4.3 (TenSEAL's ``sealapi`` binding): the he protocol's backend.

The operators (:mod:`.operators`) and the refresh (:mod:`.refresh`) use only what this module
offers, the small interface a bootstrapping backend would also offer: :meth:`CKKS.encode`,
:meth:`CKKS.encrypt`, :meth:`CKKS.decrypt`, :meth:`CKKS.rotate`, :meth:`CKKS.apply_galois`,
:meth:`CKKS.multiply`, :meth:`CKKS.multiply_plain` and :meth:`CKKS.dot_plain` (each with its
rescale), :meth:`CKKS.to_level`, and bytes in and out (:meth:`CKKS.serialize`, :meth:`CKKS.deserialize`).

Parameters (:class:`Params`) are checked by SEAL against the HomomorphicEncryption.org table for
128-bit classical security with a uniform ternary secret (SEAL's ``TC128``); an insecure set is
refused with SEAL's own message. At ``N = 2^15`` that allows 881 bits of coefficient modulus:
``[60] + [40] * 19 + [60]`` (880 bits) gives 19 rescales at scale ``2^40``.

Levels: a ciphertext's level is the number of rescales it can still take (its primes minus one);
a fresh one has :attr:`Params.levels`. Scales are tracked exactly: a plaintext factor is encoded
at the scale that lands the product on the wanted scale after the rescale, so sums never mix
scales (SEAL refuses that) and no drift accumulates; :meth:`CKKS.to_level` moves a ciphertext down
to a level *and* scale by a product with 1.

Who holds what: the client makes the secret key (:meth:`CKKS.keygen`) and ships the evaluation
keys (relinearisation and the Galois keys a program needs, seed-compressed); the server builds a
``CKKS`` from those alone and cannot decrypt. Every serialized ciphertext carries the parameter
fingerprint, the key id and a SHA-256 of its body: a ciphertext of another key, of other
parameters, or altered on the way is refused (:class:`~hf_secure.errors.KeyMismatchError`,
:class:`~hf_secure.errors.CorruptKeyError`) instead of decrypting to garbage.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
from dataclasses import dataclass

import numpy as np
from tenseal import sealapi as seal

from ...errors import CorruptKeyError, KeyMismatchError, MissingKeyError, ProgramError, UnknownOptionError
from .rns import load_bytes, plaintext_from_coefficients, save_bytes

MAGIC = b"HFSCKKS1"
_HEADER = struct.Struct("<8s16s16s32sB")  # magic, params fingerprint, key id, sha256(body), kind
SCALE_SLACK = 2.0**-12
KINDS = {"ciphertext": 1, "evaluation_keys": 2, "secret_key": 3}


@dataclass(frozen=True)
class Params:
    """CKKS parameters: ring degree ``N`` (``poly_degree``), the bit sizes of the RNS primes (the
    first and last 60-bit primes carry the final value and key switching, the middle ones are
    rescaled away one per level) and the scale ``2^scale_bits``.

    Raises UnknownOptionError for a shape SEAL cannot take and for a set that is not 128-bit
    secure (SEAL's message included)."""

    poly_degree: int = 2**15
    coeff_bits: tuple[int, ...] = (60,) + (40,) * 19 + (60,)
    scale_bits: int = 40

    def __post_init__(self):
        n, bits = self.poly_degree, self.coeff_bits
        if type(n) is not int or n < 2**12 or n > 2**15 or n & (n - 1):
            raise UnknownOptionError(f"poly_degree must be a power of two in 2^12..2^15, got {n!r}")
        if not isinstance(bits, tuple) or len(bits) < 3 or any(type(b) is not int or not 20 <= b <= 60 for b in bits):
            raise UnknownOptionError(f"coeff_bits needs a tuple of at least 3 primes of 20..60 bits, got {bits!r}")
        if type(self.scale_bits) is not int or not 20 <= self.scale_bits <= min(bits[1:-1]):
            raise UnknownOptionError(f"scale_bits {self.scale_bits!r} must be an int of 20 bits up to the "
                                     f"rescaled primes' {min(bits[1:-1])}")
        if bits[0] <= self.scale_bits:
            raise UnknownOptionError(f"the first prime ({bits[0]} bits) must exceed the scale (2^{self.scale_bits}): "
                                     "it carries the final value")
        allowed = seal.CoeffModulus.MaxBitCount(n, seal.SEC_LEVEL_TYPE.TC128)
        if sum(bits) > allowed:
            raise UnknownOptionError(f"CKKS parameters N={n}, {sum(bits)}-bit modulus are not 128-bit secure "
                                     f"(the HomomorphicEncryption.org table allows {allowed} bits at N={n})")

    @property
    def levels(self) -> int:
        """Rescales a fresh ciphertext can take."""
        return len(self.coeff_bits) - 2

    @property
    def slots(self) -> int:
        return self.poly_degree // 2

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    def as_dict(self) -> dict:
        return {"poly_degree": self.poly_degree, "coeff_bits": list(self.coeff_bits), "scale_bits": self.scale_bits}

    @classmethod
    def from_dict(cls, d: dict) -> "Params":
        if not isinstance(d, dict) or set(d) != {"poly_degree", "coeff_bits", "scale_bits"}:
            raise UnknownOptionError(f"CKKS parameters need poly_degree, coeff_bits, scale_bits; got {d!r}")
        if not isinstance(d["coeff_bits"], (list, tuple)):
            raise UnknownOptionError(f"coeff_bits must be a list, got {d['coeff_bits']!r}")
        return cls(d["poly_degree"], tuple(d["coeff_bits"]), d["scale_bits"])

    def fingerprint(self) -> bytes:
        return hashlib.sha256(repr(sorted(self.as_dict().items())).encode()).digest()[:16]

    def seal_context(self) -> "seal.SEALContext":
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(self.poly_degree)
        try:
            parms.set_coeff_modulus(seal.CoeffModulus.Create(self.poly_degree, list(self.coeff_bits)))
        except RuntimeError as err:  # e.g. not enough primes of a size congruent to 1 mod 2N
            raise UnknownOptionError(f"coeff_bits {self.coeff_bits} at N={self.poly_degree}: {err}") from err
        context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
        if not context.parameters_set():
            raise UnknownOptionError(
                f"CKKS parameters N={self.poly_degree}, {sum(self.coeff_bits)}-bit modulus {self.coeff_bits} "
                f"refused by SEAL's 128-bit check: {context.parameters_error_message()} "
                f"(at most {seal.CoeffModulus.MaxBitCount(self.poly_degree, seal.SEC_LEVEL_TYPE.TC128)} bits)")
        return context


def galois_element(step: int, poly_degree: int) -> int:
    """The Galois element of a slot rotation by ``step`` (left; negative: right), SEAL's rule
    ``3^step mod 2N``."""
    slots = poly_degree // 2
    return pow(3, step % slots, 2 * poly_degree)


class Ciphertext:
    """A CKKS ciphertext of one :class:`CKKS` context: ``slots`` complex values (we use the real
    parts) at ``scale``, able to take ``level`` more rescales. Arithmetic goes through the context
    (``a + b``, ``a - b``, ``a * b``, ``a * 0.5``, ``-a`` are shorthands)."""

    __slots__ = ("ctx", "raw")

    def __init__(self, ctx: "CKKS", raw: "seal.Ciphertext"):
        self.ctx, self.raw = ctx, raw

    @property
    def level(self) -> int:
        return self.raw.coeff_modulus_size() - 1

    @property
    def scale(self) -> float:
        return self.raw.scale

    def __add__(self, other):
        return self.ctx.add(self, other)

    def __sub__(self, other):
        return self.ctx.sub(self, other)

    def __neg__(self):
        return self.ctx.negate(self)

    def __mul__(self, other):
        if isinstance(other, Ciphertext):
            return self.ctx.multiply(self, other)
        return self.ctx.multiply_plain(self, other)

    __radd__ = __add__
    __rmul__ = __mul__


@dataclass
class Costs:
    """Operation counts of one context (for reports and benchmarks)."""

    multiplications: int = 0  # ciphertext-ciphertext, relinearised
    plain_multiplications: int = 0
    rotations: int = 0  # rotations and other automorphisms (key switches)
    rescales: int = 0


class CKKS:
    """One CKKS context: SEAL's context, encoder and evaluator, and the keys this party holds.

    ``CKKS.keygen(params)`` is the client's (secret key, encryption, decryption); ``CKKS(params,
    evaluation_keys=bytes)`` is the server's (relinearisation and Galois keys only).
    """

    def __init__(self, params: Params, *, secret_key: bytes | None = None, evaluation_keys: bytes | None = None):
        self.params = params
        self.context = params.seal_context()
        self.encoder = seal.CKKSEncoder(self.context)
        self.evaluator = seal.Evaluator(self.context)
        self.costs = Costs()
        self._monomials: dict = {}
        self.key_id: bytes | None = None
        self._secret = self._encryptor = self._decryptor = None
        self.relin_keys = self.galois_keys = None
        self.galois_elements: frozenset[int] = frozenset()
        data = self.context.key_context_data()
        self._chain = [self.context.first_context_data()]
        while self._chain[-1].next_context_data() is not None:
            self._chain.append(self._chain[-1].next_context_data())
        self.primes = [m.value() for m in data.parms().coeff_modulus()]
        if secret_key is not None:
            self._load_secret(secret_key)
        if evaluation_keys is not None:
            self.load_evaluation_keys(evaluation_keys)

    # -- keys ---------------------------------------------------------------------------------
    @classmethod
    def keygen(cls, params: Params) -> "CKKS":
        """A client context with a fresh secret key and key id."""
        ctx = cls(params)
        ctx._set_secret(seal.KeyGenerator(ctx.context).secret_key(), secrets.token_bytes(16))
        return ctx

    def _set_secret(self, sk, key_id: bytes):
        self._secret, self.key_id = sk, key_id
        self._encryptor = seal.Encryptor(self.context, sk)
        self._decryptor = seal.Decryptor(self.context, sk)

    def _need_secret(self):
        if self._secret is None:
            raise MissingKeyError("this CKKS context holds no secret key (a server's): it cannot encrypt or decrypt")

    def secret_key_bytes(self) -> bytes:
        """The secret key, framed with the parameters and key id (keep it private: 0600 files)."""
        self._need_secret()
        return self._frame("secret_key", save_bytes(self._secret))

    def _load_secret(self, blob: bytes):
        key_id, body = self._unframe(blob, "secret_key")
        sk = seal.SecretKey()
        _load(sk, self.context, body, "secret key")
        self._set_secret(sk, key_id)

    def evaluation_keys(self, steps=(), elements=()) -> bytes:
        """Seed-compressed relinearisation keys and Galois keys for the slot rotations ``steps``
        and the automorphisms ``X -> X^k`` for each ``k`` in ``elements`` (e.g. NEXUS's Subs
        ``N / 2^j + 1``): what the server needs. About 86 MB per Galois element at ``N = 2^15``
        with the full 21-prime chain (half of the expanded key)."""
        self._need_secret()
        wanted = sorted({galois_element(s, self.params.poly_degree) for s in steps} | {int(e) for e in elements})
        for e in wanted:
            if e % 2 == 0 or not 0 < e < 2 * self.params.poly_degree:
                raise UnknownOptionError(f"{e} is not a Galois element of N={self.params.poly_degree}")
        keygen = seal.KeyGenerator(self.context, self._secret)
        relin = save_bytes(keygen.create_relin_keys())
        galois = save_bytes(keygen.create_galois_keys(wanted)) if wanted else b""
        body = struct.pack("<QQ", len(relin), len(galois)) + relin + galois
        return self._frame("evaluation_keys", body)

    def load_evaluation_keys(self, blob: bytes) -> None:
        key_id, body = self._unframe(blob, "evaluation_keys")
        if self.key_id is not None and key_id != self.key_id:
            raise KeyMismatchError("these evaluation keys belong to another secret key")
        if len(body) < 16:
            raise CorruptKeyError("evaluation keys: the body is too short")
        n_relin, n_galois = struct.unpack_from("<QQ", body)
        if 16 + n_relin + n_galois != len(body):
            raise CorruptKeyError("evaluation keys: the lengths in the header do not match the body")
        relin = seal.RelinKeys()
        _load(relin, self.context, body[16:16 + n_relin], "relinearisation keys")
        galois = seal.GaloisKeys()
        if n_galois:
            _load(galois, self.context, body[16 + n_relin:], "Galois keys")
        elements = {e for e in range(1, 2 * self.params.poly_degree, 2) if n_galois and galois.has_key(e)}
        self.relin_keys, self.galois_keys, self.galois_elements = relin, galois, frozenset(elements)
        self.key_id = key_id

    # -- framing ------------------------------------------------------------------------------
    def _frame(self, kind: str, body: bytes) -> bytes:
        return _HEADER.pack(MAGIC, self.params.fingerprint(), self.key_id or bytes(16),
                            hashlib.sha256(body).digest(), KINDS[kind]) + body

    def _unframe(self, blob: bytes, kind: str) -> tuple[bytes, bytes]:
        if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) < _HEADER.size:
            raise CorruptKeyError(f"not a serialized CKKS {kind.replace('_', ' ')} (too short)")
        magic, fp, key_id, digest, got = _HEADER.unpack_from(blob)
        body = bytes(blob[_HEADER.size:])
        if magic != MAGIC or got != KINDS[kind]:
            raise CorruptKeyError(f"not a serialized CKKS {kind.replace('_', ' ')}")
        if fp != self.params.fingerprint():
            raise KeyMismatchError(f"this {kind.replace('_', ' ')} was made under other CKKS parameters")
        if hashlib.sha256(body).digest() != digest:
            raise CorruptKeyError(f"the {kind.replace('_', ' ')} was altered (its SHA-256 does not match)")
        return key_id, body

    # -- levels -------------------------------------------------------------------------------
    def parms_id(self, level: int):
        """SEAL's parms_id of ``level`` (rescales left)."""
        if not 0 <= level <= self.params.levels:
            raise ProgramError(f"level {level} outside 0..{self.params.levels}")
        return self._chain[self.params.levels - level].parms_id()

    def prime(self, level: int) -> int:
        """The prime a rescale at ``level`` divides by (the last of that level)."""
        return self.primes[level]

    def modulus(self, level: int) -> int:
        return math.prod(self.primes[:level + 1])

    # -- client: encrypt, decrypt ---------------------------------------------------------------
    def encode(self, values, level: int, scale: float) -> "seal.Plaintext":
        """``values`` (up to ``slots`` reals or complex numbers, or one real for every slot) as a
        plaintext at ``level`` and ``scale``; ProgramError if a value times the scale does not fit
        the level's modulus or the plaintext would round to zero (SEAL would make a transparent
        ciphertext)."""
        pt = seal.Plaintext()
        if np.ndim(values) == 0:
            v = float(values)
            if not math.isfinite(v):
                raise ProgramError("non-finite constant to encode")
            if v == 0.0 or abs(v) * scale < 0.5:
                raise ProgramError(f"constant {v} at scale {scale:.3g} rounds to zero")
            if abs(v) * scale >= 2.0 ** (math.log2(self.modulus(level)) - 2):
                raise ProgramError(f"constant {v} at scale {scale:.3g} overflows level {level}")
            self.encoder.encode(v, self.parms_id(level), scale, pt)
            return pt
        v = np.asarray(values).reshape(-1)
        v = v.astype(np.complex128 if np.iscomplexobj(v) else np.float64, copy=False)
        if v.size > self.params.slots:
            raise ProgramError(f"{v.size} values do not fit {self.params.slots} slots")
        if not np.isfinite(v).all():
            raise ProgramError("non-finite value to encode")
        top = float(np.abs(v).max(initial=0.0)) * scale
        if top >= 2.0 ** (math.log2(self.modulus(level)) - 2):
            raise ProgramError(f"values up to {top:.3g} at scale {scale:.3g} overflow level {level}")
        self.encoder.encode(v.tolist(), self.parms_id(level), scale, pt)
        return pt

    def encrypt(self, values, level: int | None = None) -> Ciphertext:
        """Encrypt ``values`` (reals, up to ``slots``; the rest are 0) under the secret key at
        ``level`` (default: the top) and the nominal scale."""
        self._need_secret()
        level = self.params.levels if level is None else level
        ct = seal.Ciphertext(self.context)
        self._encryptor.encrypt_symmetric(self.encode(values, level, self.params.scale), ct)
        return Ciphertext(self, ct)

    def decrypt(self, ct: Ciphertext) -> np.ndarray:
        """The ``slots`` real values of ``ct`` (float64)."""
        self._need_secret()
        pt = seal.Plaintext()
        self._decryptor.decrypt(ct.raw, pt)
        return np.asarray(self.encoder.decode_double(pt), dtype=np.float64)

    def decrypt_plaintext(self, ct: Ciphertext) -> "seal.Plaintext":
        self._need_secret()
        pt = seal.Plaintext()
        self._decryptor.decrypt(ct.raw, pt)
        return pt

    def encrypt_plaintext(self, pt: "seal.Plaintext") -> bytes:
        """A fresh seed-compressed symmetric encryption of ``pt``, serialized (half the size of a
        full ciphertext: the second component is a seed)."""
        self._need_secret()
        blob = save_bytes(self._encryptor.encrypt_symmetric(pt))
        return self._frame("ciphertext", blob)

    # -- arithmetic -----------------------------------------------------------------------------
    def _new(self) -> "seal.Ciphertext":
        return seal.Ciphertext(self.context)

    def _check(self, *cts: Ciphertext):
        for ct in cts:
            if ct.ctx is not self:
                raise ProgramError("a ciphertext of another CKKS context")

    def align(self, a: Ciphertext, b: Ciphertext) -> tuple[Ciphertext, Ciphertext]:
        """``a`` and ``b`` at the lower of their levels, with equal scales: the higher one is moved
        down to the other's level and scale exactly. At one level, scales may differ by a
        relative :data:`SCALE_SLACK` (a product of two ciphertexts has ``s1 s2 / q``, and SEAL's
        40-bit primes are within ``2e-5`` of ``2^40`` at ``N = 2^15``); they are treated as equal,
        a relative error of that size in the sum. Anything further apart is a ProgramError."""
        if a.level > b.level:
            return self.to_level(a, b.level, b.scale), b
        if b.level > a.level:
            return a, self.to_level(b, a.level, a.scale)
        if not math.isclose(a.scale, b.scale, rel_tol=SCALE_SLACK):
            raise ProgramError(f"adding ciphertexts of scales {a.scale:.6g} and {b.scale:.6g} at one level")
        return a, b

    def _combine(self, op, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        self._check(a, b)
        a, b = self.align(a, b)
        out, kept = self._new(), b.raw.scale
        b.raw.scale = a.raw.scale  # equal up to SCALE_SLACK (see align); restored below
        try:
            op(a.raw, b.raw, out)
        finally:
            b.raw.scale = kept
        return Ciphertext(self, out)

    def add(self, a: Ciphertext, b) -> Ciphertext:
        if not isinstance(b, Ciphertext):
            return self.add_plain(a, b)
        return self._combine(self.evaluator.add, a, b)

    def sub(self, a: Ciphertext, b) -> Ciphertext:
        if not isinstance(b, Ciphertext):
            return self.add_plain(a, -np.asarray(b, dtype=np.float64))
        return self._combine(self.evaluator.sub, a, b)

    def negate(self, a: Ciphertext) -> Ciphertext:
        out = self._new()
        self.evaluator.negate(a.raw, out)
        return Ciphertext(self, out)

    def add_plain(self, a: Ciphertext, values) -> Ciphertext:
        """``a + values`` (a scalar or up to ``slots`` reals), no level used."""
        if not np.any(values):
            return a
        out = self._new()
        self.evaluator.add_plain(a.raw, self.encode(values, a.level, a.scale), out)
        return Ciphertext(self, out)

    def add_plaintext(self, a: Ciphertext, pt: "seal.Plaintext") -> Ciphertext:
        """``a + pt`` for a plaintext at ``a``'s level and scale."""
        out = self._new()
        self.evaluator.add_plain(a.raw, pt, out)
        return Ciphertext(self, out)

    def sub_plaintext(self, a: Ciphertext, pt: "seal.Plaintext") -> Ciphertext:
        out = self._new()
        self.evaluator.sub_plain(a.raw, pt, out)
        return Ciphertext(self, out)

    def multiply_plain(self, a: Ciphertext, values, scale: float | None = None) -> Ciphertext:
        """``a * values`` (a scalar or up to ``slots`` reals), rescaled: one level, and the result
        at exactly ``scale`` (default: ``a``'s)."""
        if a.level < 1:
            raise ProgramError("no level left for a product")
        if not np.any(values):  # SEAL would return a transparent ciphertext
            raise ProgramError("a product with an all-zero plaintext")
        target = a.scale if scale is None else scale
        q = self.prime(a.level)
        pt = self.encode(values, a.level, target * q / a.scale)
        out = self._new()
        self.evaluator.multiply_plain(a.raw, pt, out)
        self.evaluator.rescale_to_next_inplace(out)
        out.scale = target  # exact: (a.scale * target q / a.scale) / q
        self.costs.plain_multiplications += 1
        self.costs.rescales += 1
        return Ciphertext(self, out)

    def dot_plain(self, cts: list[Ciphertext], vectors, scale: float | None = None) -> Ciphertext:
        """``sum_i cts[i] * vectors[i]`` (all ``cts`` at one level and scale; ``vectors[i]`` up to
        ``slots`` reals, an all-zero one skipped), with a single rescale at the end: one level,
        the result at exactly ``scale`` (default: the inputs')."""
        level, in_scale = cts[0].level, cts[0].scale
        if level < 1:
            raise ProgramError("no level left for a product")
        if any(ct.level != level or ct.scale != in_scale for ct in cts):
            raise ProgramError("dot_plain needs its ciphertexts at one level and scale")
        target = in_scale if scale is None else scale
        pt_scale = target * self.prime(level) / in_scale
        out = tmp = None
        for ct, v in zip(cts, vectors, strict=True):
            if not np.any(v):
                continue
            tmp = tmp or self._new()
            self.evaluator.multiply_plain(ct.raw, self.encode(v, level, pt_scale), tmp)
            if out is None:
                out, tmp = tmp, None
            else:
                self.evaluator.add_inplace(out, tmp)
            self.costs.plain_multiplications += 1
        if out is None:
            raise ProgramError("dot_plain of all-zero vectors: the result would be a transparent ciphertext")
        self.evaluator.rescale_to_next_inplace(out)
        out.scale = target
        self.costs.rescales += 1
        return Ciphertext(self, out)

    def multiply_monomial(self, a: Ciphertext, power: int) -> Ciphertext:
        """``a * X^power`` (``power`` in ``[-N, N)``, ``X^-k = -X^(N-k)``) on the plaintext
        polynomial: exact, no level."""
        n = self.params.poly_degree
        if not -n <= power < n:
            raise ProgramError(f"monomial power {power} outside [-{n}, {n})")
        key = (a.level, power)
        if key not in self._monomials:
            coeffs = [0] * n
            coeffs[power % n] = 1 if power >= 0 else -1
            self._monomials[key] = plaintext_from_coefficients(self.context, coeffs, self.parms_id(a.level), 1.0)
        out = self._new()
        self.evaluator.multiply_plain(a.raw, self._monomials[key], out)
        return Ciphertext(self, out)

    def multiply(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        """``a * b`` slot-wise, relinearised and rescaled (one level; scale ``a.scale b.scale / q``)."""
        self._check(a, b)
        if self.relin_keys is None and self._secret is not None:
            self.relin_keys = _relin(self)
        if self.relin_keys is None:
            raise MissingKeyError("no relinearisation keys loaded")
        if a.level != b.level:
            a, b = (self.to_level(a, b.level), b) if a.level > b.level else (a, self.to_level(b, a.level))
        if a.level < 1:
            raise ProgramError("no level left for a product")
        out = self._new()
        if a.raw is b.raw:
            self.evaluator.square(a.raw, out)
        else:
            self.evaluator.multiply(a.raw, b.raw, out)
        self.evaluator.relinearize_inplace(out, self.relin_keys)
        self.evaluator.rescale_to_next_inplace(out)
        self.costs.multiplications += 1
        self.costs.rescales += 1
        return Ciphertext(self, out)

    def square(self, a: Ciphertext) -> Ciphertext:
        return self.multiply(a, a)

    def landing_scale(self, other: Ciphertext, level: int) -> float:
        """The scale a ciphertext at ``level`` needs so that its product with ``other`` (moved to
        ``level``) comes out at exactly the nominal scale after the rescale."""
        return self.params.scale * self.prime(level) / other.scale

    def to_level(self, a: Ciphertext, level: int, scale: float | None = None) -> Ciphertext:
        """``a`` moved down to ``level``; with ``scale``, also set exactly to that scale (by a
        product with 1 at the last step: needs ``a.level > level``)."""
        if level > a.level:
            raise ProgramError(f"cannot raise a ciphertext from level {a.level} to {level}: refresh it")
        if scale is None or math.isclose(scale, a.scale, rel_tol=1e-12):
            if level == a.level:
                return a
            out = self._new()
            self.evaluator.mod_switch_to(a.raw, self.parms_id(level), out)
            return Ciphertext(self, out)
        if level == a.level:
            raise ProgramError(f"cannot change scale {a.scale:.6g} -> {scale:.6g} without a level")
        return self.multiply_plain(self.to_level(a, level + 1), 1.0, scale)

    def rotate(self, a: Ciphertext, step: int) -> Ciphertext:
        """Slots rotated left by ``step`` (``out[i] = a[i + step]``); needs its Galois key."""
        if step % self.params.slots == 0:
            return a
        return self.apply_galois(a, galois_element(step, self.params.poly_degree))

    def apply_galois(self, a: Ciphertext, element: int) -> Ciphertext:
        """The automorphism ``X -> X^element`` of ``a``'s plaintext (a key switch)."""
        if element not in self.galois_elements:
            raise MissingKeyError(f"no Galois key for element {element} (the client did not make one)")
        out = self._new()
        self.evaluator.apply_galois(a.raw, element, self.galois_keys, out)
        self.costs.rotations += 1
        return Ciphertext(self, out)

    # -- bytes --------------------------------------------------------------------------------
    def serialize(self, ct: Ciphertext) -> bytes:
        """``ct`` as framed bytes (SEAL's zstd-compressed form)."""
        return self._frame("ciphertext", save_bytes(ct.raw))

    def deserialize(self, blob: bytes) -> Ciphertext:
        """A ciphertext from :meth:`serialize` or :meth:`encrypt_plaintext`; KeyMismatchError
        for one of another key or parameter set, CorruptKeyError for altered bytes."""
        key_id, body = self._unframe(blob, "ciphertext")
        if self.key_id is not None and key_id != self.key_id:
            raise KeyMismatchError("a ciphertext under another secret key")
        ct = self._new()
        _load(ct, self.context, body, "ciphertext")
        return Ciphertext(self, ct)


def _relin(ctx: CKKS):
    rk = seal.RelinKeys()
    seal.KeyGenerator(ctx.context, ctx._secret).create_relin_keys(rk)
    return rk


def _load(obj, context, body: bytes, what: str) -> None:
    try:
        load_bytes(obj, context, body)
    except (ValueError, RuntimeError) as err:
        raise CorruptKeyError(f"{what}: SEAL cannot load it ({err})") from err
