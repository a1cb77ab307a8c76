"""The client's side of the permute protocol: its key and the transforms it applies.

Two ways to place the token embedding and the LM head, fixed at conversion:

``embeddings="client"``
    The client keeps the embedding table (and LM head). It sends ``x Pi`` where ``x`` are the token
    embeddings, and receives the permuted final hidden states ``h Pi``; it computes the logits
    itself as ``(h Pi) (W_head[:, pi])^T``. Key: ``hidden`` permutation, ``embed_tokens``,
    ``lm_head`` (when not tied to the embedding) and ``lm_head_bias`` (when present).

``embeddings="server"``
    The server keeps both with their rows permuted by a vocabulary permutation ``sigma``. The
    client sends ``sigma^-1(ids)`` and receives logits permuted by ``sigma``. Key: ``hidden`` and
    ``vocab`` permutations only.

In both modes the client can also ask for the final hidden states, which it un-permutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import CorruptKeyError, UnknownOptionError

EMBEDDING_MODES = ("client", "server")


def check_embedding_mode(mode: str) -> str:
    """``mode`` if it is "client" or "server"; UnknownOptionError otherwise."""
    if mode not in EMBEDDING_MODES:
        raise UnknownOptionError(f"embeddings must be one of {EMBEDDING_MODES}, got {mode!r}")
    return mode


def inverse(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``x[..., perm][..., inverse(perm)] == x``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=perm.dtype)
    return inv


def gather_last(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[..., index]``: gather on a 2-D view is the fastest CPU form (about 6x advanced indexing)."""
    flat = tensor.reshape(-1, tensor.shape[-1])
    out = torch.gather(flat, 1, index.expand(flat.shape[0], -1))
    return out.view(*tensor.shape[:-1], index.numel())


def is_permutation(perm: torch.Tensor) -> bool:
    """Whether ``perm`` is a 1-D int64 permutation of ``0..n-1`` (n > 0)."""
    return (
        perm.dtype == torch.int64
        and perm.dim() == 1
        and perm.numel() > 0
        and torch.equal(torch.sort(perm).values, torch.arange(perm.numel()))
    )


@dataclass
class PermuteKey:
    """The client key of a permuted model."""

    embeddings: str
    hidden: torch.Tensor
    key_id: torch.Tensor  # 16 random bytes: keys of two conversions never share a fingerprint
    vocab: torch.Tensor | None = None
    embed_tokens: torch.Tensor | None = None
    lm_head: torch.Tensor | None = None
    lm_head_bias: torch.Tensor | None = None

    def to_tensors(self) -> dict[str, torch.Tensor]:
        names = ("hidden", "key_id", "vocab", "embed_tokens", "lm_head", "lm_head_bias")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> "PermuteKey":
        """The key from its safetensors tensors and metadata; CorruptKeyError for anything that is
        not a well-formed key of its embedding mode (non-permutations, wrong table shapes)."""
        if meta.get("protocol") != "permute":
            raise CorruptKeyError(f"not a permute key (protocol {meta.get('protocol')!r})")
        if meta.get("embeddings") not in EMBEDDING_MODES:
            raise CorruptKeyError(f"key metadata 'embeddings' must be one of {EMBEDDING_MODES}")
        fields = set(cls.__dataclass_fields__) - {"embeddings"}
        if not {"hidden", "key_id"} <= set(tensors) <= fields:
            raise CorruptKeyError(f"key tensors {sorted(tensors)}: need hidden and key_id, may have {sorted(fields)}")
        key = cls(embeddings=meta["embeddings"], **tensors)
        if not is_permutation(key.hidden):
            raise CorruptKeyError("key field 'hidden' is not a permutation")
        if key.embeddings == "server" and (key.vocab is None or not is_permutation(key.vocab)):
            raise CorruptKeyError("a server-embedding key needs a 'vocab' permutation")
        if key.embeddings == "client" and key.embed_tokens is None:
            raise CorruptKeyError("a client-embedding key needs 'embed_tokens'")
        for name in ("embed_tokens", "lm_head"):
            table = getattr(key, name)
            if table is not None and (not table.is_floating_point() or table.dim() != 2 or not table.shape[0]
                                      or table.shape[1] != key.hidden.numel()):
                raise CorruptKeyError(f"key field {name!r} must be a float matrix [vocab, {key.hidden.numel()}]")
        head, bias = key.lm_head if key.lm_head is not None else key.embed_tokens, key.lm_head_bias
        if bias is not None and (head is None or not bias.is_floating_point() or bias.shape != head.shape[:1]):
            raise CorruptKeyError("key field 'lm_head_bias' must be a float vector [vocab]")
        return key


class PermuteClient:
    """Applies the key: builds what the server receives and reads what it returns."""

    def __init__(self, key: PermuteKey, dtype: torch.dtype = torch.float32, embedding_noise: float = 0.0):
        self.key = key
        self.embedding_noise = embedding_noise  # std of the noise added to client-held embeddings
        self.embeddings = key.embeddings
        self.hidden = key.hidden
        self.hidden_inv = inverse(key.hidden)
        if key.embeddings == "server":
            self.vocab_inv = inverse(key.vocab)
            self.vocab_size = key.vocab.numel()
        else:
            # Rows looked up already permuted: E[ids][:, pi] = E[:, pi][ids].
            self.embed_permuted = key.embed_tokens.to(dtype)[:, self.hidden].contiguous()
            self.vocab_size = self.embed_permuted.shape[0]
            head = key.lm_head if key.lm_head is not None else key.embed_tokens
            # Logits straight from permuted hidden states: (h Pi) (W[:, pi])^T = h W^T.
            self.head_permuted = head.to(dtype)[:, self.hidden].contiguous()
            self.head_bias = key.lm_head_bias.to(dtype) if key.lm_head_bias is not None else None

    def encode(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
               token_types: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """What the server receives instead of the private tokens or embeddings.

        ``token_types`` are GPT-2's token type ids, which GPT-2 embeds with its token table
        (``wte(input_ids) + wte(token_type_ids)``): with client-held embeddings they are added to
        the embeddings here, with server-held ones they travel vocabulary-permuted like the ids.
        """
        if self.embeddings == "server":
            out = ({"inputs_embeds": gather_last(inputs_embeds, self.hidden)} if inputs_embeds is not None
                   else {"input_ids": self.vocab_inv[input_ids]})
            if token_types is not None:
                out["token_type_ids"] = self.vocab_inv[token_types]
            return out
        embeds = (gather_last(inputs_embeds, self.hidden) if inputs_embeds is not None
                  else torch.nn.functional.embedding(input_ids, self.embed_permuted))
        if token_types is not None:
            embeds = embeds + torch.nn.functional.embedding(token_types, self.embed_permuted)
        if self.embedding_noise:  # i.i.d. noise: permuting it first changes nothing
            embeds = embeds + self.embedding_noise * torch.randn_like(embeds)
        return {"inputs_embeds": embeds}

    def server_output(self, want: str) -> str:
        """Which tensor to ask the server for: ``want`` is "logits" or "hidden"."""
        return "logits" if want == "logits" and self.embeddings == "server" else "hidden"

    def decode(self, tensor: torch.Tensor, want: str) -> torch.Tensor:
        """Turn the server's permuted output into the plaintext model's output."""
        if want == "hidden":
            return gather_last(tensor, self.hidden_inv)
        if self.embeddings == "server":
            return gather_last(tensor, self.vocab_inv)
        logits = tensor.to(self.head_permuted.dtype) @ self.head_permuted.T
        return logits + self.head_bias if self.head_bias is not None else logits
