"""The permute protocol's engine: the client key applied around a server (in this process or HTTP).

Each query: the client transforms its input with the key (:meth:`.client.PermuteClient.encode`:
permuted embeddings, or vocabulary-permuted ids), the server runs the permuted transformers model
(:class:`hf_secure.server.runtime.ModelServer`), and the client un-permutes what comes back
(:meth:`.client.PermuteClient.decode`). :meth:`observe` records every tensor the server
receives, and the cache length and ``logits_to_keep`` of the request.
"""

from __future__ import annotations

import json

import torch

from ...accounting import Traffic
from ...errors import KeyMismatchError, UnknownOptionError
from ...families import family
from ...keys import resolve_key
from ...server.backends import HttpBackend, InProcessBackend
from ...server.runtime import ModelServer, read_section
from ..engine import SecureEngine
from .client import PermuteClient, PermuteKey


class PermuteEngine(SecureEngine):
    """STIP's client: a key bound to a server that holds the permuted weights.

    Options: ``key`` (path of the client key; None: the local key store), ``server_url`` (None: the
    server part runs in this process), ``server_token`` and ``ca_bundle`` (for ``server_url``),
    ``embedding_noise`` (client-held embeddings: the standard deviation of Gaussian noise added to
    the input embeddings before they are permuted -- the noise defence ``hf-secure audit`` measures).
    Raises KeyMismatchError when the key and the server's model differ.
    """

    name = "permute"
    options = ("key", "server_url", "server_token", "ca_bundle", "embedding_noise")

    def __init__(self, client: PermuteClient, backend):
        self.client = client
        self.backend = backend
        self.vocab_size = client.vocab_size

    @classmethod
    def connect(cls, folder: str, config, *, causal: bool, dtype: torch.dtype, timeout: float, key=None,
                server_url: str | None = None, server_token: str | None = None,
                ca_bundle: str | None = None, embedding_noise: float | None = None) -> "PermuteEngine":
        if server_url is None and (server_token is not None or ca_bundle is not None):
            raise UnknownOptionError("server_token and ca_bundle need a server_url")
        section = read_section(config)
        if embedding_noise is not None:
            if section["embeddings"] != "client":
                raise UnknownOptionError("embedding_noise needs client-held embeddings (convert with embeddings='client')")
            if isinstance(embedding_noise, bool) or not isinstance(embedding_noise, (int, float)) \
                    or not 0 <= embedding_noise < float("inf"):
                raise UnknownOptionError(f"embedding_noise must be a finite number >= 0, got {embedding_noise!r}")
        if causal and not family(section["family"]).causal:  # (hidden states of a causal model are fine)
            raise UnknownOptionError(f"this {section['family']} checkpoint has no LM head: load it with SecureModel")
        tensors, meta = resolve_key(key, section["key_fingerprint"])
        recorded = json.loads(meta.get("weights", "{}"))
        if recorded != section.get("weights"):
            raise KeyMismatchError("the key was issued for different weight files than this checkpoint's config records")
        client = PermuteClient(PermuteKey.from_tensors(tensors, meta), dtype=dtype,
                               embedding_noise=float(embedding_noise or 0.0))
        if server_url is None:
            backend = InProcessBackend(ModelServer(folder, dtype=dtype))
        else:
            backend = HttpBackend(server_url, timeout=timeout, token=server_token, ca_bundle=ca_bundle)
        info = backend.info()
        if info["key_fingerprint"] != meta["fingerprint"] or info["weights"] != recorded:
            raise KeyMismatchError(
                f"the server at {server_url or 'this process'} runs a different model "
                f"(fingerprint {info['key_fingerprint']}) than this key ({meta['fingerprint']})"
            )
        return cls(client, backend)

    @property
    def stats(self) -> Traffic:
        return self.backend.stats

    def _forward(self, input_ids, inputs_embeds, token_type_ids, extra: dict, want: str, cache=None,
                 logits_to_keep: int = 0) -> tuple[dict, str]:
        inputs = self.client.encode(input_ids, inputs_embeds, token_type_ids)
        inputs.update({k: v for k, v in extra.items() if v is not None})
        if self._recorder is not None:
            for name, tensor in inputs.items():
                self._recorder("server", name, tensor)
            self._recorder("server", "past_length", torch.tensor([cache.length if cache is not None else 0]))
            self._recorder("server", "logits_to_keep", torch.tensor([logits_to_keep]))
        output = self.client.server_output(want)
        outputs, length = self.backend.forward(
            inputs,
            session_id=cache.session_id if cache is not None else None,
            past_length=cache.length if cache is not None else 0,
            output=output,
            logits_to_keep=logits_to_keep,
        )
        if cache is not None:
            cache.length = length
        return outputs, output

    def hidden_states(self, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids):
        extra = {"attention_mask": attention_mask, "token_type_ids": token_type_ids, "position_ids": position_ids}
        outputs, _ = self._forward(input_ids, inputs_embeds, None, extra, "hidden")
        pooled = outputs.get("pooled")
        return (self.client.decode(outputs["hidden"], "hidden"),
                self.client.decode(pooled, "hidden") if pooled is not None else None)

    def logits(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, logits_to_keep, token_type_ids):
        extra = {"attention_mask": attention_mask, "position_ids": position_ids}
        outputs, output = self._forward(input_ids, inputs_embeds, token_type_ids, extra, "logits", cache,
                                        logits_to_keep)
        return self.client.decode(outputs[output], "logits")

    def open_session(self) -> str:
        return self.backend.open_session()

    def close_session(self, session_id: str) -> None:
        self.backend.close_session(session_id)

    def close(self) -> None:
        self.backend.close()
