"""Cryptographic randomness for masks and shares: AES-128 in counter mode.

Every mask, share and dealer secret comes from here: either a fresh key from the OS (``fresh``)
or a key derived with SHA-256 from a secret seed and public labels (``derive``: the dealer and a
server expand the same seed into the same stream without talking). torch's and NumPy's
generators are not cryptographic (their state can be recovered from outputs) and the default
torch generator is even seeded with a constant, so none of them is used for secrets.
"""

from __future__ import annotations

import hashlib
import os

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_BLOCK = 16


class PRG:
    """A keystream cut into uniform int64 ring elements."""

    def __init__(self, key: bytes):
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(_BLOCK))).encryptor()
        self._zeros = b""

    @classmethod
    def fresh(cls) -> "PRG":
        """A stream under a fresh 128-bit key from the OS (the dealer's own secrets: the sine mask)."""
        return cls(os.urandom(16))

    @classmethod
    def derive(cls, seed: bytes, *labels) -> "PRG":
        """The stream under ``SHA-256(seed | labels)[:16]``: one independent AES-CTR key per
        (seed, request number, label), so no key is used for two masks."""
        digest = hashlib.sha256(seed + b"|" + "|".join(map(str, labels)).encode()).digest()
        return cls(digest[:16])

    def ring(self, shape) -> torch.Tensor:
        """Uniform elements of Z_2^64 (int64) of the given shape."""
        shape = tuple(shape)
        n = 1
        for d in shape:
            n *= d
        nbytes = 8 * n
        if len(self._zeros) < nbytes:
            self._zeros = bytes(max(nbytes, 2 * len(self._zeros)))
        out = torch.empty(n + 2, dtype=torch.int64)  # update_into wants one block of slack
        self._encryptor.update_into(memoryview(self._zeros)[:nbytes], memoryview(out.numpy()).cast("B"))
        return out[:n].view(shape)
