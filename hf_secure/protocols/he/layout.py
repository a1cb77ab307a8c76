"""Where each value of a ``[tokens, features]`` activation sits in the CKKS slots.

A ciphertext holds ``tokens`` token positions (``L``, a power of two) times ``per_ct =
slots / L`` features; a ``width``-feature activation takes ``count = ceil(width / per_ct)``
ciphertexts. Inside one, the features are grouped in heads of ``group`` features (attention's
head size; any divisor of ``per_ct`` for other activations), and

    slot(t, head h, feature i of the head) = i * (heads_per_ct * L) + h * L + t.

Two folds are then full cycles of the slots (:mod:`.operators`: ``count * stride = slots``):
over all features of a token (``count = per_ct``, ``stride = L``: LayerNorm) and over the
features of a head (``count = group``, ``stride = heads_per_ct * L``: attention's dot
products). And the slots of one token, ``t + L j``, form one orbit of the expansion's
automorphisms (:mod:`.linear`), which is what makes its matrix product work on this layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...errors import ProgramError


@dataclass(frozen=True)
class Layout:
    slots: int
    tokens: int
    width: int
    group: int

    def __post_init__(self):
        for name in ("slots", "tokens", "group"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ProgramError(f"layout {name} {v} is not a power of two")
        if self.tokens > self.slots or self.per_ct % self.group:
            raise ProgramError(f"{self.tokens} tokens and heads of {self.group} do not fit {self.slots} slots")

    @property
    def per_ct(self) -> int:
        return self.slots // self.tokens

    @property
    def heads_per_ct(self) -> int:
        return self.per_ct // self.group

    @property
    def count(self) -> int:
        return math.ceil(self.width / self.per_ct)

    def feature_offsets(self) -> np.ndarray:
        """``[per_ct]`` slot offsets (of token 0) of the features of one ciphertext, in order."""
        j = np.arange(self.per_ct)
        return (j % self.group) * (self.heads_per_ct * self.tokens) + (j // self.group) * self.tokens

    def pack(self, x: np.ndarray) -> list[np.ndarray]:
        """``x`` (``[tokens', width]``, ``tokens' <= tokens``; missing tokens must be filled by the
        caller with real rows, see :func:`pad_tokens`) as ``count`` slot vectors."""
        if x.shape[0] > self.tokens or x.shape[1] != self.width:
            raise ProgramError(f"activation {tuple(x.shape)} does not fit layout {self}")
        full = np.zeros((self.tokens, self.count * self.per_ct), dtype=x.dtype)
        full[:x.shape[0], :self.width] = x
        offsets = self.feature_offsets()
        out = []
        for c in range(self.count):
            v = np.zeros(self.slots, dtype=x.dtype)
            v[offsets[:, None] + np.arange(self.tokens)[None, :]] = full[:, c * self.per_ct:(c + 1) * self.per_ct].T
            out.append(v)
        return out

    def unpack(self, vectors: list[np.ndarray], tokens: int | None = None) -> np.ndarray:
        """The inverse of :meth:`pack`: ``[tokens, width]``."""
        offsets = self.feature_offsets()
        cols = [v[offsets[:, None] + np.arange(self.tokens)[None, :]].T for v in vectors]
        return np.concatenate(cols, axis=1)[:tokens or self.tokens, :self.width]

    def per_feature(self, values: np.ndarray) -> list[np.ndarray]:
        """A per-feature vector (``[width]``, e.g. a bias or LayerNorm's gamma) repeated over the
        tokens, as slot vectors (0 on padded features)."""
        return self.pack(np.broadcast_to(values, (self.tokens, self.width)))


def pad_tokens(x: np.ndarray, tokens: int) -> np.ndarray:
    """``x`` (``[n, width]``) with rows repeated cyclically up to ``tokens`` rows: padded positions
    carry real activations, so every slot stays in the range the operators are built for (a
    zero row would have no variance, and LayerNorm's inverse square root diverges there); they are
    masked out as keys and dropped from the output."""
    if x.shape[0] > tokens:
        raise ProgramError(f"{x.shape[0]} tokens do not fit {tokens} token positions")
    return x[np.arange(tokens) % x.shape[0]]
