"""One party's FSS key for one query: a stream of tensors in program order, on disk or in memory.

The dealer writes a party's key record by record while it runs the program on masks, so a key
larger than memory never exists in memory (Sigma's BERT-base key is 16.8 GiB per party); the
server reads it back in the same order, layer by layer, during the online phase.

File layout (little-endian)::

    b"HFSFSSK1" | u32 header length | header (JSON) | u32 CRC-32 of the header | records... | end record

    record: u8 dtype code | u8 ndim | ndim x u64 dims | raw tensor bytes | u32 CRC-32
            (of the record's head and bytes: it catches corruption, every burst of up to 32 bits
            and all but 2^-32 of the rest; not an attacker, who could rewrite the CRC too)
    end:    u8 255        | u64 number of records

The header names what the key is for (``key_id``, ``party``, ``program``: the model and its
shapes, sequence length and step, ring and fixed-point parameters); a server refuses a key whose
header does not match the query it is about to run (:class:`~hf_secure.errors.KeyMismatchError`),
a file that ends before its end record or a record whose digest does not match its bytes (a
flipped bit would otherwise give garbage silently: :class:`~hf_secure.errors.CorruptKeyError`), a record
whose shape or dtype differs from what the program reads (the key was made for another program),
and a key whose ``key_id`` is already in its ledger of used keys
(:class:`~hf_secure.errors.KeyReuseError`): a one-time key used twice would let the two parties'
openings of two queries be subtracted. A used key file is deleted.

Nothing here is pickle: dtypes are a fixed table, shapes plain integers.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import torch

from ...errors import CorruptKeyError, KeyMismatchError, KeyReuseError

MAGIC = b"HFSFSSK1"
_DTYPES = [torch.int64, torch.uint8, torch.int32]
_END = 255
_MAX_DIMS = 8
_DIGEST = 4


def _digest(head: bytes, data) -> bytes:
    return struct.pack("<I", zlib.crc32(data, zlib.crc32(head)))


class KeyWriter:
    """Append-only writer of one party's key (a file, or memory when ``path`` is None)."""

    def __init__(self, path: str | os.PathLike | None, header: dict):
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self._file = os.fdopen(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")
        else:
            self._file = io.BytesIO()
        blob = json.dumps(header, sort_keys=True).encode()
        self._file.write(MAGIC + struct.pack("<I", len(blob)) + blob + _digest(b"", blob))
        self.records = 0
        self.nbytes = len(MAGIC) + 4 + len(blob) + _DIGEST

    def put(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.dtype not in _DTYPES or tensor.dim() > _MAX_DIMS:
            raise ValueError(f"key records are {_DTYPES} tensors of at most {_MAX_DIMS} dims, got {tensor.dtype}")
        head = struct.pack("<BB", _DTYPES.index(tensor.dtype), tensor.dim()) + struct.pack(f"<{tensor.dim()}Q", *tensor.shape)
        data = tensor.numpy().tobytes()
        self._file.write(head + data + _digest(head, data))
        self.records += 1
        self.nbytes += len(head) + len(data) + _DIGEST

    def close(self) -> bytes | None:
        """End the key; returns its bytes when it lives in memory."""
        self._file.write(struct.pack("<BQ", _END, self.records))
        self.nbytes += 9
        if self.path is None:
            return self._file.getvalue()
        self._file.close()
        return None


class KeyReader:
    """Reader of one party's key; ``source`` is a path or the bytes of an in-memory key.

    ``expect``: header fields that must match (KeyMismatchError otherwise). ``ledger``: a file of
    used key ids; the key is entered there before its first record is read, and a key already
    entered is refused (KeyReuseError).
    """

    def __init__(self, source, expect: dict | None = None, ledger: str | os.PathLike | None = None):
        self.path = None if isinstance(source, (bytes, bytearray)) else Path(source)
        try:
            self._file = io.BytesIO(source) if self.path is None else open(self.path, "rb")
        except FileNotFoundError as err:
            raise CorruptKeyError(f"FSS key {self.path} does not exist (was it made for this query?)") from err
        magic = self._file.read(len(MAGIC))
        if magic != MAGIC:
            raise CorruptKeyError(f"{self.path or 'key'} is not an hf_secure FSS key")
        (length,) = struct.unpack("<I", self._read(4))
        blob = self._read(length)
        if self._read(_DIGEST) != _digest(b"", blob):  # the header holds the server's seed
            raise CorruptKeyError(f"{self.path or 'key'}: the header is corrupt (CRC)")
        try:
            self.header = json.loads(blob)
        except ValueError as err:
            raise CorruptKeyError(f"{self.path or 'key'}: unreadable header") from err
        for field, value in (expect or {}).items():
            if self.header.get(field) != value:
                raise KeyMismatchError(
                    f"FSS key {self.header.get('key_id')} is for {field}={self.header.get(field)!r}, "
                    f"this query needs {value!r}")
        self.records = 0
        if ledger is not None:
            _enter(Path(ledger), str(self.header.get("key_id")))

    def _read(self, n: int) -> bytes:
        data = self._file.read(n)
        if len(data) != n:
            raise CorruptKeyError(f"FSS key {self.header.get('key_id') if hasattr(self, 'header') else ''} "
                                  f"is truncated (record {getattr(self, 'records', 0)})")
        return data

    def take(self, shape, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """The next record, which must have this shape and dtype."""
        code, ndim = struct.unpack("<BB", self._read(2))
        if code == _END:
            raise KeyMismatchError(f"FSS key {self.header.get('key_id')} ended after {self.records} records; "
                                   "the program needs more (a key for another model or sequence length?)")
        if code >= len(_DTYPES) or ndim > _MAX_DIMS:
            raise CorruptKeyError(f"FSS key {self.header.get('key_id')}: malformed record {self.records}")
        dims = tuple(struct.unpack(f"<{ndim}Q", self._read(8 * ndim)))
        if dims != tuple(shape) or _DTYPES[code] != dtype:
            raise KeyMismatchError(
                f"FSS key {self.header.get('key_id')} record {self.records} is {_DTYPES[code]} {dims}, the program "
                f"reads {dtype} {tuple(shape)} (a key for another model or sequence length, or a damaged file?)")
        out = torch.empty(dims, dtype=dtype)
        data = out.numpy().reshape(-1).view("uint8")  # read straight into the tensor: no copies
        if self._file.readinto(data) != data.nbytes:
            raise CorruptKeyError(f"FSS key {self.header.get('key_id')} is truncated (record {self.records})")
        if self._read(_DIGEST) != _digest(struct.pack("<BB", code, ndim) + struct.pack(f"<{ndim}Q", *dims), data):
            raise CorruptKeyError(f"FSS key {self.header.get('key_id')}: record {self.records} is corrupt (digest)")
        self.records += 1
        return out

    def finish(self) -> None:
        """Check that the whole key was read, close it and delete its file."""
        code = self._file.read(1)
        if code != bytes([_END]):
            raise KeyMismatchError(f"FSS key {self.header.get('key_id')} has records the program did not read")
        (count,) = struct.unpack("<Q", self._read(8))
        if count != self.records:
            raise CorruptKeyError(f"FSS key {self.header.get('key_id')}: end record counts {count}, read {self.records}")
        self.close(delete=True)

    def close(self, delete: bool = False) -> None:
        self._file.close()
        if delete and self.path is not None:
            self.path.unlink(missing_ok=True)


def _enter(ledger: Path, key_id: str) -> None:
    """Record ``key_id`` as used; refuse it if it already is."""
    ledger.parent.mkdir(parents=True, exist_ok=True)
    used = set(ledger.read_text().split()) if ledger.exists() else set()
    if key_id in used:
        raise KeyReuseError(f"FSS key {key_id} was used before; a one-time key is never used twice")
    with open(ledger, "a") as f:
        f.write(key_id + "\n")
