"""Fixed-key AES-128 and the Matyas-Meyer-Oseas PRG that every FSS key is expanded with.

A 128-bit block is held as two int64 words, ``(..., 2)``, in the little-endian byte order of the
16 AES bytes (word 0 is bytes 0-7), so the same tensor is the same 16 bytes on every device.

``mmo(s, i) = AES_{K_i}(s) xor s`` with public fixed keys ``K_i`` (Matyas-Meyer-Oseas). It is
the length-doubling PRG of the DPF tree (keys L and R) and the leaf conversion (key C), as in
Boyle-Gilboa-Ishai (CCS 2016) and Sigma (PoPETs 2024, section 3): modelling fixed-key AES as a
random permutation, the outputs on unknown uniform seeds are pseudorandom.

Two backends give bit-identical results:

- ``cryptography`` (OpenSSL's AES-NI ECB) for CPU tensors: one call per batch of blocks;
- :class:`TableAES`, AES written with 32-bit T-table lookups in torch ops, for CUDA tensors (and
  for CPU tests that check the two agree: the CUDA path is the same code on another device).

Errors: ValueError for a block tensor that is not ``int64 (..., 2)``.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# The public fixed keys: derived from their names so that nobody picked them.
FIXED_KEYS = {name: hashlib.sha256(f"hf_secure fss mmo {name}".encode()).digest()[:16] for name in "LRC"}
BACKENDS = ("cryptography", "table")


def check_blocks(blocks: torch.Tensor) -> None:
    if blocks.dtype != torch.int64 or blocks.dim() == 0 or blocks.shape[-1] != 2:
        raise ValueError(f"AES blocks are int64 tensors of shape (..., 2), got {blocks.dtype} {tuple(blocks.shape)}")


def encrypt(blocks: torch.Tensor, key: str, backend: str | None = None) -> torch.Tensor:
    """``AES_{K_key}`` of every block. ``backend`` None picks cryptography on CPU, table elsewhere."""
    check_blocks(blocks)
    if backend is None:
        backend = "cryptography" if blocks.device.type == "cpu" else "table"
    if backend == "cryptography":
        if blocks.device.type != "cpu":
            raise ValueError("the cryptography backend runs on CPU tensors only")
        return _openssl_encrypt(blocks, key)
    if backend == "table":
        return _table(blocks.device).encrypt(blocks, key)
    raise ValueError(f"unknown AES backend {backend!r}; choose one of {BACKENDS}")


def mmo(blocks: torch.Tensor, key: str, backend: str | None = None) -> torch.Tensor:
    """Matyas-Meyer-Oseas: ``AES_{K_key}(s) xor s``."""
    return encrypt(blocks, key, backend) ^ blocks


@lru_cache(maxsize=None)
def _ecb(key: str):
    return Cipher(algorithms.AES(FIXED_KEYS[key]), modes.ECB())


def _openssl_encrypt(blocks: torch.Tensor, key: str) -> torch.Tensor:
    flat = blocks.contiguous().view(-1, 2)
    out = torch.empty(flat.shape[0] + 1, 2, dtype=torch.int64)  # update_into wants one block of slack
    encryptor = _ecb(key).encryptor()
    encryptor.update_into(memoryview(flat.numpy()).cast("B"), memoryview(out.numpy()).cast("B"))
    return out[:-1].view(blocks.shape)


def _sbox() -> list[int]:
    """The AES S-box from its definition: inversion in GF(2^8), then the affine map (FIPS-197 5.1.1)."""
    def mul(a, b):
        p = 0
        for _ in range(8):
            if b & 1:
                p ^= a
            a = ((a << 1) ^ (0x1B if a & 0x80 else 0)) & 0xFF
            b >>= 1
        return p

    inverse = [0] * 256
    for a in range(1, 256):
        for b in range(1, 256):
            if mul(a, b) == 1:
                inverse[a] = b
                break
    box = []
    for a in range(256):
        x = inverse[a]
        y = x
        for shift in range(1, 5):
            y ^= ((x << shift) | (x >> (8 - shift))) & 0xFF
        box.append(y ^ 0x63)
    return box


def _xtime(a: int) -> int:
    return ((a << 1) ^ (0x1B if a & 0x80 else 0)) & 0xFF


class TableAES:
    """AES-128 encryption of int64 block tensors with four 256-entry T-tables (any torch device).

    State words are big-endian 32-bit columns (FIPS-197 3.5) held in int64; a round is 16 table
    gathers and XORs. Round keys of the fixed keys are expanded once per device.
    """

    def __init__(self, device: torch.device):
        box = _sbox()
        t0 = [(_xtime(s) << 24) | (s << 16) | (s << 8) | (_xtime(s) ^ s) for s in box]
        rot = lambda w, n: ((w >> n) | (w << (32 - n))) & 0xFFFFFFFF  # noqa: E731
        tables = [t0, [rot(w, 8) for w in t0], [rot(w, 16) for w in t0], [rot(w, 24) for w in t0]]
        self.te = torch.tensor(tables, dtype=torch.int64, device=device)
        self.sbox = torch.tensor(box, dtype=torch.int64, device=device)
        self.round_keys = {name: torch.tensor(self._expand(key, box), dtype=torch.int64, device=device)
                           for name, key in FIXED_KEYS.items()}

    @staticmethod
    def _expand(key: bytes, box: list[int]) -> list[list[int]]:
        words = [int.from_bytes(key[4 * i: 4 * i + 4], "big") for i in range(4)]
        rcon = 1
        for i in range(4, 44):
            w = words[i - 1]
            if i % 4 == 0:
                w = ((w << 8) | (w >> 24)) & 0xFFFFFFFF
                w = (box[w >> 24] << 24) | (box[(w >> 16) & 255] << 16) | (box[(w >> 8) & 255] << 8) | box[w & 255]
                w ^= rcon << 24
                rcon = _xtime(rcon)
            words.append(words[i - 4] ^ w)
        return [words[4 * r: 4 * r + 4] for r in range(11)]

    def encrypt(self, blocks: torch.Tensor, key: str) -> torch.Tensor:
        rk = self.round_keys[key]
        data = blocks.contiguous().view(torch.uint8).view(-1, 16).long()
        s = [(data[:, 4 * c] << 24) | (data[:, 4 * c + 1] << 16) | (data[:, 4 * c + 2] << 8) | data[:, 4 * c + 3]
             for c in range(4)]
        s = [s[c] ^ rk[0, c] for c in range(4)]
        te0, te1, te2, te3 = self.te
        for r in range(1, 10):
            s = [te0[s[c] >> 24] ^ te1[(s[(c + 1) % 4] >> 16) & 255] ^ te2[(s[(c + 2) % 4] >> 8) & 255]
                 ^ te3[s[(c + 3) % 4] & 255] ^ rk[r, c] for c in range(4)]
        box = self.sbox
        s = [(box[s[c] >> 24] << 24) | (box[(s[(c + 1) % 4] >> 16) & 255] << 16)
             | (box[(s[(c + 2) % 4] >> 8) & 255] << 8) | box[s[(c + 3) % 4] & 255] for c in range(4)]
        s = [s[c] ^ rk[10, c] for c in range(4)]
        out = torch.stack([(s[c] >> shift) & 255 for c in range(4) for shift in (24, 16, 8, 0)], dim=1)
        return out.to(torch.uint8).view(torch.int64).view(blocks.shape)


@lru_cache(maxsize=None)
def _table(device: torch.device) -> TableAES:
    return TableAES(device)
