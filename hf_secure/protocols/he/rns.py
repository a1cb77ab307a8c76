"""Exact integer coefficients of SEAL CKKS plaintexts (TenSEAL ``sealapi``).

A CKKS plaintext of SEAL 4.3 at a level with primes p_0..p_{k-1} holds a polynomial of degree
< N in RNS + NTT form: ``pt[j*N + i]`` is the i-th NTT value of the polynomial mod p_j. This
module converts between that form and the polynomial's integer coefficients, centered in
(-q/2, q/2] with q = p_0 * ... * p_{k-1}, without any floating point:

* ``plaintext_coefficients`` reads the residues, runs SEAL's inverse negacyclic NTT per prime
  and recombines them by the Chinese remainder theorem in Python integers.
* ``plaintext_from_coefficients`` reduces the integers mod each prime, runs SEAL's forward NTT,
  and, because the binding has no setter for plaintext data, loads the result through an
  uncompressed SEAL serialization written to a temporary file:

      SEALHeader (16 bytes, little endian): magic u16 = 0xA15E, header_size u8 = 16,
          version_major u8, version_minor u8, compr_mode u8 = 0 (none), reserved u16 = 0,
          size u64 = total bytes including this header
      parms_id 4 x u64, coeff_count u64 = k*N, scale f64
      DynArray: its own SEALHeader (size = 16 + 8 + 8*k*N), element count u64 = k*N,
          k*N x u64 data

The NTT tables are built with ``util.NTTTables(log2 N, p_j)``, which SEAL's context builds the
same way (deterministic minimal primitive root), so they match the plaintext's tables.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import struct
import tempfile
from collections.abc import Sequence

import numpy as np
from tenseal import sealapi

_util = sealapi._sealapi_cpp.util  # SEAL's util namespace; tenseal.sealapi does not re-export it

_HEADER = struct.Struct("<HBBBBHQ")  # magic, header_size, major, minor, compr_mode, reserved, size
_PLAINTEXT_META = struct.Struct("<4QQd")  # parms_id, coeff_count, scale
_COUNT = struct.Struct("<Q")


def save_bytes(obj) -> bytes:
    """A SEAL object's serialization (SEAL saves to paths only: through a private temporary
    file, in memory under /dev/shm where there is one)."""
    path = _tmp_path()
    try:
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def load_bytes(obj, context: sealapi.SEALContext, data: bytes) -> None:
    """Load ``obj`` from its serialization ``data`` (SEAL's own errors propagate)."""
    path = _tmp_path()
    try:
        with open(path, "wb") as f:
            f.write(data)
        obj.load(context, path)
    finally:
        os.unlink(path)


def _tmp_path() -> str:
    folder = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    fd, path = tempfile.mkstemp(prefix="hfs-ckks-", dir=folder)
    os.close(fd)
    return path


class _Level:
    """The primes, NTT tables and CRT constants of one level: built once per ring degree and
    primes (:func:`_level`), since refreshes convert plaintexts at the same few levels again and
    again."""

    def __init__(self, n: int, primes: tuple[int, ...]):
        self.n, self.primes = n, list(primes)
        self.tables = [_util.NTTTables(n.bit_length() - 1, sealapi.Modulus(p)) for p in primes]
        self.q = math.prod(primes)
        # x = sum_j ((x_j * (q/p_j)^-1) mod p_j) * (q/p_j)  (mod q)
        self.crt = [(pow(self.q // p, -1, p), self.q // p) for p in primes]


@functools.lru_cache(maxsize=64)
def _cached_level(n: int, primes: tuple[int, ...]) -> _Level:
    return _Level(n, primes)


def _level(context: sealapi.SEALContext, parms_id: Sequence[int]) -> _Level:
    context_data = context.get_context_data(list(parms_id))
    if context_data is None:
        raise ValueError("parms_id does not belong to this context")
    parms = context_data.parms()
    return _cached_level(parms.poly_modulus_degree(), tuple(m.value() for m in parms.coeff_modulus()))


def plaintext_coefficients(context: sealapi.SEALContext, pt: sealapi.Plaintext) -> list[int]:
    """Return the exact centered integer coefficients of an NTT-form CKKS plaintext.

    Args:
        context: the ``sealapi.SEALContext`` the plaintext belongs to.
        pt: a plaintext in NTT form (as made by ``CKKSEncoder.encode`` or ``Decryptor.decrypt``)
            at any level; it holds k*N residues for the k primes of ``pt.parms_id()``.

    Returns:
        N Python ints; element i is the coefficient of X^i, each in (-q/2, q/2] where q is
        the product of the k primes of the plaintext's level.

    Raises:
        ValueError: if ``pt`` is not in NTT form or its parms_id is not in ``context``.
    """
    if not pt.is_ntt_form():
        raise ValueError("plaintext is not in NTT form (not a CKKS plaintext)")
    level = _level(context, pt.parms_id())
    n = level.n
    flat = list(map(pt.__getitem__, range(pt.coeff_count())))
    acc = 0
    for j, (p, table, (inv, cofactor)) in enumerate(zip(level.primes, level.tables, level.crt)):
        # The binding's inverse_ntt_negacyclic_harvey runs the lazy variant, so residues lie in
        # [0, 2p); the "% p" below reduces them.
        residues = np.array(_util.inverse_ntt_negacyclic_harvey(flat[j * n:(j + 1) * n], table),
                            dtype=object)
        acc = acc + residues * inv % p * cofactor
    acc = acc % level.q
    return np.where(acc > level.q // 2, acc - level.q, acc).tolist()


def plaintext_from_coefficients(context: sealapi.SEALContext, coeffs: Sequence[int],
                                parms_id: Sequence[int], scale: float) -> sealapi.Plaintext:
    """Build the NTT-form CKKS plaintext whose polynomial has exactly the given coefficients.

    Args:
        context: the ``sealapi.SEALContext``.
        coeffs: N integers (Python or numpy ints, any sign); element i is the coefficient of X^i;
            |c| < q/2 for the product q of the primes at ``parms_id``.
        parms_id: the level of the result, e.g. ``context.first_parms_id()`` or a ciphertext's
            ``parms_id()``.
        scale: the CKKS scale recorded in the plaintext (metadata only; the coefficients are
            stored as given, not multiplied by it).

    Returns:
        A ``sealapi.Plaintext`` in NTT form at ``parms_id``, holding c mod p_j for each prime.

    Raises:
        ValueError: if ``parms_id`` is not in ``context``, ``coeffs`` does not have N entries,
            or a coefficient has |c| >= q/2.
        TypeError: if a coefficient is not an integer.
    """
    level = _level(context, parms_id)
    if len(coeffs) != level.n:
        raise ValueError(f"expected {level.n} coefficients, got {len(coeffs)}")
    values = np.array([operator.index(c) for c in coeffs], dtype=object)
    if np.any(2 * np.abs(values) >= level.q):
        raise ValueError("a coefficient is out of range: |c| must be < q/2 at this level")
    data = np.concatenate([
        np.array(_util.ntt_negacyclic_harvey((values % p).tolist(), table), dtype=np.uint64)
        for p, table in zip(level.primes, level.tables)
    ])
    return _load_plaintext(context, list(parms_id), data, scale)


def _load_plaintext(context: sealapi.SEALContext, parms_id: list[int], data: np.ndarray,
                    scale: float) -> sealapi.Plaintext:
    """Load a Plaintext from its members via an uncompressed SEAL serialization (see module doc)."""
    defaults = sealapi.Serialization.SEALHeader()

    def header(body_size: int) -> bytes:
        return _HEADER.pack(defaults.magic, defaults.header_size, defaults.version_major,
                            defaults.version_minor, 0, 0, defaults.header_size + body_size)

    array = _COUNT.pack(data.size) + data.astype("<u8").tobytes()
    members = (_PLAINTEXT_META.pack(*parms_id, data.size, scale)
               + header(len(array)) + array)
    pt = sealapi.Plaintext()
    load_bytes(pt, context, header(len(members)) + members)
    return pt
