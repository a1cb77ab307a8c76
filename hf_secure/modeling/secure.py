"""Drop-in client models: transformers' interface, computation on the server.

``SecureModelForCausalLM.from_pretrained(DIR, key=KEYFILE)`` returns a ``PreTrainedModel`` with
``GenerationMixin`` whose ``forward`` returns ``CausalLMOutputWithPast`` and whose ``generate()``
works as usual; ``SecureModel`` returns ``BaseModelOutputWithPooling`` (BERT feature extraction,
or final hidden states of a causal model). Each forward transforms the private input with the
client key, sends it to the server (a :class:`~hf_secure.server.runtime.ModelServer` in this
process by default, or ``server_url=...``), and un-transforms the answer. The server's KV cache
is reached through :class:`~hf_secure.modeling.session_cache.RemoteSessionCache`.

Fail closed: a model that has no key yet (loaded by ``pipeline()``, which binds the key
afterwards) refuses to run, and the key must match the checkpoint's fingerprint and recorded
weight digests, in process and over HTTP alike.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, GenerationConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast

from ..errors import KeyMismatchError, MissingKeyError, ServerError, UnknownOptionError
from ..hub import push_converted, resolve_folder
from ..keys import resolve_key
from ..protocols.mpc.client import MPCBertEngine, MPCCausalEngine, MPCEngine
from ..protocols.permute.client import PermuteClient, PermuteKey
from ..server.backends import HttpBackend, InProcessBackend
from ..server.runtime import ModelServer, read_section
from .session_cache import RemoteSessionCache

# from_pretrained arguments that transformers (pipelines, Auto classes) pass and that mean
# nothing for a client model: accepted and ignored. Anything else is an unknown option.
_IGNORED_HF_KWARGS = {"_from_pipeline", "_commit_hash", "trust_remote_code", "device_map", "code_revision",
                      "config", "low_cpu_mem_usage", "attn_implementation"}
_PROTOCOLS = ("permute", "mpc")


def _check_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.min() < 0 or input_ids.max() >= vocab_size:
        raise UnknownOptionError(f"input_ids out of range [0, {vocab_size})")


class SecurePreTrainedModel(PreTrainedModel):
    """Common loading, key binding and transport of the client models."""

    config_class = PreTrainedConfig
    base_model_prefix = "secure"
    main_input_name = "input_ids"
    _client_dtype = torch.float32

    def __init__(self, config, folder: str):
        super().__init__(config)
        self.folder = folder
        self.section = read_section(config)
        self.engine: PermuteClient | MPCEngine | None = None
        self.backend = None
        self.post_init()

    # transformers reads device and dtype from parameters; the client keeps its key tensors
    # outside nn.Parameters (they must never be trained, re-initialised or saved with the model).
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return self._client_dtype

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *,
        key=None,
        server_url: str | None = None,
        protocol: str | None = None,
        rendezvous: str | None = None,
        timeout: float = 60.0,
        dtype=torch.float32,
        revision: str | None = None,
        token=None,
        cache_dir=None,
        local_files_only: bool = False,
        **kwargs,
    ):
        """Load the client side of a converted checkpoint (local folder or Hub id).

        Args:
            key: path of the client key file; None looks the key up in the local key store.
            server_url: URL of ``hf-secure serve``; None runs the server part in this process.
            protocol: the protocol the checkpoint was converted for ("permute" or "mpc"); None: as
                recorded in the checkpoint. With "mpc" every party runs on this machine, unless
            rendezvous: (mpc) "tcp://HOST:PORT" of server 0: only the client runs here, the model
                owner, both servers and the dealer join with ``hf-secure party``.
            timeout: seconds before a server call fails.
            dtype: float dtype of the client's computation (and of the in-process server).
        """
        unknown = set(kwargs) - _IGNORED_HF_KWARGS
        if unknown:
            raise UnknownOptionError(f"unknown option(s) for {cls.__name__}.from_pretrained: {sorted(unknown)}")
        if protocol is not None and protocol not in _PROTOCOLS:
            raise UnknownOptionError(f"unknown protocol {protocol!r}; available: {_PROTOCOLS}")
        if dtype in (None, "auto"):
            dtype = torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        folder = resolve_folder(pretrained_model_name_or_path, revision=revision, token=token,
                                cache_dir=cache_dir, local_files_only=local_files_only)
        config = AutoConfig.from_pretrained(folder)
        section = read_section(config)
        if protocol is not None and section["protocol"] != protocol:
            raise UnknownOptionError(f"{folder} was converted for protocol {section['protocol']!r}, not {protocol!r}")
        for name, value in section.get("client_config", {}).items():
            setattr(config, name, value)
        model = cls(config, folder)
        model._client_dtype = dtype
        if Path(folder, "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        if "_from_pipeline" in kwargs and key is None and server_url is None and rendezvous is None:
            return model  # the secure pipeline binds with the key, server or rendezvous it was given, right after
        return model.bind(key=key, server_url=server_url, timeout=timeout, rendezvous=rendezvous)

    def bind(self, key=None, server_url: str | None = None, timeout: float = 60.0, rendezvous: str | None = None):
        """Attach the client key and connect to the server (permute), or start the parties (mpc)."""
        if self.section["protocol"] != "mpc" and rendezvous is not None:
            raise UnknownOptionError("rendezvous is an option of the mpc protocol")
        if self.section["protocol"] == "mpc":
            if key is not None or server_url is not None:
                raise UnknownOptionError("the mpc protocol takes no key and no server_url (its parties meet at a "
                                         "rendezvous)")
            causal = self.section.get("family", "bert") != "bert"
            if causal != isinstance(self, SecureModelForCausalLM):
                wanted = "SecureModelForCausalLM" if causal else "SecureModel"
                raise UnknownOptionError(f"this {self.section.get('family', 'bert')} checkpoint runs as {wanted} "
                                         f"with protocol='mpc', not {type(self).__name__}")
            engine_class = MPCCausalEngine if causal else MPCBertEngine
            self.engine = self.backend = engine_class(self.folder, self.config, timeout=max(timeout, 300.0),
                                                      rendezvous=rendezvous)
            return self
        tensors, meta = resolve_key(key, self.section["key_fingerprint"])
        recorded = json.loads(meta.get("weights", "{}"))
        if recorded != self.section.get("weights"):
            raise KeyMismatchError("the key was issued for different weight files than this checkpoint's config records")
        engine = PermuteClient(PermuteKey.from_tensors(tensors, meta), dtype=self._client_dtype)
        if server_url is None:
            backend = InProcessBackend(ModelServer(self.folder, dtype=self._client_dtype))
        else:
            backend = HttpBackend(server_url, timeout=timeout)
        info = backend.info()
        if info["key_fingerprint"] != meta["fingerprint"] or info["weights"] != recorded:
            raise KeyMismatchError(
                f"the server at {server_url or 'this process'} runs a different model "
                f"(fingerprint {info['key_fingerprint']}) than this key ({meta['fingerprint']})"
            )
        self.engine, self.backend = engine, backend
        return self

    def _require_bound(self) -> PermuteClient:
        if self.engine is None:
            raise MissingKeyError(
                "this secure model has no key bound: pass key=PATH to from_pretrained/pipeline, or import it with "
                "`hf-secure keys import PATH`"
            )
        return self.engine

    def _check_flags(self, **flags) -> None:
        wanted = [name for name, value in flags.items() if value]
        if wanted:
            raise UnknownOptionError(f"{', '.join(wanted)} not available through a secure model")

    def _server_forward(self, engine, input_ids, inputs_embeds, extra, want, session=None, logits_to_keep=0):
        if (input_ids is None) == (inputs_embeds is None):
            raise UnknownOptionError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            _check_ids(input_ids, engine.vocab_size)
        inputs = engine.encode(input_ids, inputs_embeds)
        inputs.update({k: v.long() for k, v in extra.items() if v is not None})
        output = engine.server_output(want)
        outputs, length = self.backend.forward(
            inputs,
            session_id=session.session_id if session is not None else None,
            past_length=session.length if session is not None else 0,
            output=output,
            logits_to_keep=logits_to_keep,
        )
        if session is not None:
            session.length = length
        return outputs, output

    def secure_report(self) -> dict | None:
        """mpc: the last query's report per role (bytes, messages, rounds, seconds per scope -- one
        scope per layer -- and the dealer's offline bytes and seconds); None for other protocols."""
        return getattr(self.engine, "last_report", None)

    def save_pretrained(self, save_directory, **kwargs):
        """Copy the converted checkpoint (never the key) to ``save_directory``."""
        shutil.copytree(self.folder, save_directory, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".cache", ".git*"))

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the converted checkpoint and its model card; key material is refused."""
        return push_converted(self.folder, repo_id, **kwargs)


class SecureModel(SecurePreTrainedModel):
    """Final hidden states (and BERT's pooled output) computed on the server."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        engine = self._require_bound()
        self._check_flags(output_attentions=output_attentions, output_hidden_states=output_hidden_states, **kwargs)
        if isinstance(engine, MPCBertEngine):
            if inputs_embeds is not None or input_ids is None:
                raise UnknownOptionError("the mpc protocol takes input_ids (shared as one-hot rows)")
            _check_ids(input_ids, engine.vocab_size)
            hidden = engine.hidden_states(input_ids, attention_mask, token_type_ids, position_ids)
            return BaseModelOutputWithPooling(last_hidden_state=hidden)
        extra = {"attention_mask": attention_mask, "token_type_ids": token_type_ids, "position_ids": position_ids}
        outputs, _ = self._server_forward(engine, input_ids, inputs_embeds, extra, "hidden")
        pooled = outputs.get("pooled")
        return BaseModelOutputWithPooling(
            last_hidden_state=engine.decode(outputs["hidden"], "hidden"),
            pooler_output=engine.decode(pooled, "hidden") if pooled is not None else None,
        )


class SecureModelForCausalLM(SecurePreTrainedModel, GenerationMixin):
    """A causal LM whose transformer runs on the server; ``generate()`` keeps the KV cache there."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is created by the first forward, on the server

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        engine = self._require_bound()
        self._check_flags(output_attentions=output_attentions, output_hidden_states=output_hidden_states, **kwargs)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if past_key_values is not None and not isinstance(past_key_values, RemoteSessionCache):
            if past_key_values.get_seq_length() > 0:
                raise UnknownOptionError("a secure model continues only from its own RemoteSessionCache")
            past_key_values = None
        if past_key_values is None and use_cache:
            past_key_values = RemoteSessionCache(self.backend, self.backend.open_session())
        if past_key_values is not None and past_key_values.backend is not self.backend:
            raise ServerError("this cache belongs to another server connection")
        keep = logits_to_keep if isinstance(logits_to_keep, int) else 0
        if isinstance(engine, MPCCausalEngine):
            if inputs_embeds is not None or input_ids is None:
                raise UnknownOptionError("the mpc protocol takes input_ids (shared as one-hot rows)")
            _check_ids(input_ids, engine.vocab_size)
            logits = engine.logits(input_ids, attention_mask, position_ids, past_key_values, keep)
            return self._causal_output(logits, logits_to_keep, labels, past_key_values if use_cache else None)
        extra = {"attention_mask": attention_mask, "position_ids": position_ids}
        outputs, output = self._server_forward(engine, input_ids, inputs_embeds, extra, "logits",
                                               session=past_key_values, logits_to_keep=keep)
        logits = engine.decode(outputs[output], "logits")
        return self._causal_output(logits, logits_to_keep, labels, past_key_values if use_cache else None)

    def _causal_output(self, logits, logits_to_keep, labels, cache) -> CausalLMOutputWithPast:
        if not isinstance(logits_to_keep, int):
            logits = logits[:, logits_to_keep]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.engine.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
