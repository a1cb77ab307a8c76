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

import copy
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, GenerationConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast

from ..compat import CACHE_NAME, one_cache
from ..engines import protocol_engine
from ..errors import InvalidInputError, MissingKeyError, ServerError, UnknownOptionError
from ..families import FamilySpec, family
from ..hub import check_uploadable, push_converted, resolve_folder
from ..protocols.engine import SecureEngine
from ..server.runtime import read_section
from .session_cache import RemoteSessionCache

# from_pretrained arguments that transformers (pipelines, Auto classes) pass and that mean
# nothing for a client model: accepted and ignored. Anything else is an unknown option.
_IGNORED_HF_KWARGS = {"_from_pipeline", "_commit_hash", "trust_remote_code", "device_map", "code_revision",
                      "config", "low_cpu_mem_usage", "attn_implementation"}


def _check_int(name: str, tensor, shape: tuple[int, ...] | None = None, low: int = 0,
               high: int | None = None, allow_bool: bool = False) -> torch.Tensor:
    """``tensor`` as int64 after checking type, shape and range; a clear error otherwise. Bool
    tensors only where transformers takes them as 0/1 (masks), never as indices."""
    if (not isinstance(tensor, torch.Tensor) or tensor.is_floating_point() or tensor.is_complex()
            or (tensor.dtype == torch.bool and not allow_bool)):
        raise InvalidInputError(f"{name} must be an integer tensor, got {type(tensor).__name__}"
                                f"{'' if not isinstance(tensor, torch.Tensor) else ' of ' + str(tensor.dtype)}")
    if shape is not None and tuple(tensor.shape) != shape:
        raise InvalidInputError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if tensor.numel() and (tensor.min() < low or (high is not None and tensor.max() >= high)):
        raise InvalidInputError(f"{name} out of range [{low}, {high if high is not None else 'inf'})")
    return tensor.long()


def _check_ids(input_ids, vocab_size: int) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise InvalidInputError("input_ids must be a non-empty integer tensor of shape (batch, sequence)")
    return _check_int("input_ids", input_ids, high=vocab_size)


def _check_positions(config, spec: FamilySpec, length: int, position_ids) -> None:
    """Learned position tables (GPT-2, BERT) end at their size; rotary positions (Llama) do not."""
    if spec.rope:
        return
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    top = length if position_ids is None else int(position_ids.max()) + 1 if position_ids.numel() else 0
    if limit and max(length, top) > limit:
        raise InvalidInputError(f"sequence of {max(length, top)} positions is longer than the model's {limit}")


def _check_off(**flags) -> None:
    """Output flags a secure model cannot honour: None or False only, never judged by truthiness."""
    for name, value in flags.items():
        if value is None or value is False:
            continue
        if value is True:
            raise UnknownOptionError(f"{name}=True is not available through a secure model")
        raise UnknownOptionError(f"{name} must be a bool or None, got {type(value).__name__}")


def _check_bool(name: str, value) -> None:
    if value is not None and not isinstance(value, bool):
        raise UnknownOptionError(f"{name} must be a bool or None, got {type(value).__name__}")


def _refuse_unknown(model, kwargs: dict) -> None:
    if kwargs:
        raise UnknownOptionError(f"{type(model).__name__}.forward does not take {sorted(kwargs)}; it takes "
                                 f"{', '.join(model.forward_arguments)}")


def _as_return(output, return_dict):
    _check_bool("return_dict", return_dict)
    return output.to_tuple() if return_dict is False else output


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
        self.family = family(self.section["family"])
        self.engine: SecureEngine | None = None
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
        server_token: str | None = None,
        ca_bundle: str | None = None,
        protocol: str | None = None,
        rendezvous: str | None = None,
        party_key: str | None = None,
        reveal: str | None = None,
        embedding_noise: float | None = None,
        record_views: bool | None = None,
        device: str | None = None,
        key_dir: str | None = None,
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
            server_token: the bearer token its operator issued; None reads ``HF_SECURE_TOKEN``.
                (``token`` is the Hub's, as in transformers, and never reaches the server.)
            ca_bundle: PEM file of the certificate authorities to trust for an https server_url.
            protocol: the protocol the checkpoint was converted for (a name in
                :data:`hf_secure.engines.PROTOCOLS`); None: as recorded in the checkpoint. "fss"
                also runs a plain (unconverted) checkpoint of a supported family, "he" a plain BERT
                checkpoint (the client's CKKS key: the key store's, or ``key``). With "mpc"
                every party runs on this machine, unless ``rendezvous`` is given.
            rendezvous: (mpc) "tcp://HOST:PORT" of server 0: only the client runs here, the model
                owner, both servers and the dealer join with ``hf-secure party``.
            party_key: (mpc, with rendezvous) the client's key file from ``hf-secure party-keys``;
                None reads ``HF_SECURE_PARTY_KEY``.
            reveal: (mpc, causal models) what the client learns per position: "logits" (default),
                or "token": the most likely token only, computed on shares, returned as point-mass
                logits; ``generate()`` then decodes greedily and refuses sampling, beams, logits
                processors and scores (see docs/threat-model.md, "What the output reveals").
            embedding_noise: (permute, client-held embeddings) standard deviation of the Gaussian
                noise the client adds to its input embeddings before permuting them: the noise
                defence, whose cost and (lack of) protection ``hf-secure audit`` measures.
            record_views: (mpc, every party on this machine) each server hands the client what it
                saw, for ``hf-secure audit`` (:meth:`~hf_secure.protocols.engine.SecureEngine.observe`).
            device: (fss) where the servers compute: "cpu" (default) or "cuda" (the CPU, with a
                warning, where there is no GPU).
            key_dir: (fss) where the servers keep the dealer's one-time keys until used (default: a
                private temporary folder per server).
            timeout: seconds before a server call fails (mpc: at least 300 per query, which a large
                model's query can take; a smaller value is raised to 300).
            dtype: float dtype of the client's computation (and of the in-process server).
        """
        unknown = set(kwargs) - _IGNORED_HF_KWARGS
        if unknown:
            raise UnknownOptionError(f"unknown option(s) for {cls.__name__}.from_pretrained: {sorted(unknown)}")
        if protocol is not None:
            protocol_engine(protocol)  # an unknown name: UnknownOptionError listing the registered ones
        if dtype in (None, "auto"):
            dtype = torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        folder = resolve_folder(pretrained_model_name_or_path, revision=revision, token=token,
                                cache_dir=cache_dir, local_files_only=local_files_only)
        config = AutoConfig.from_pretrained(folder)
        if getattr(config, "hf_secure", None) is None and "_from_pipeline" in kwargs and protocol is None:
            # a plain checkpoint in a pipeline: runnable with protocol="fss" or "he", which the pipeline checks
            section = {**read_section(config, str(pretrained_model_name_or_path), "fss"), "plain": True}
        else:
            section = read_section(config, str(pretrained_model_name_or_path), protocol)
        if protocol is not None and section["protocol"] != protocol:
            raise UnknownOptionError(f"{folder} was converted for protocol {section['protocol']!r}, not {protocol!r}")
        for name, value in section.get("client_config", {}).items():
            setattr(config, name, value)
        if getattr(config, "hf_secure", None) is None:
            config.hf_secure = section  # a plain checkpoint run as it is (fss, he)
        model = cls(config, folder)
        model._client_dtype = dtype
        if Path(folder, "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        options = {"key": key, "server_url": server_url, "server_token": server_token, "ca_bundle": ca_bundle,
                   "rendezvous": rendezvous, "party_key": party_key, "reveal": reveal,
                   "embedding_noise": embedding_noise, "record_views": record_views, "device": device,
                   "key_dir": key_dir}
        if "_from_pipeline" in kwargs and all(value is None for value in options.values()):
            return model  # the secure pipeline binds with the key, server or rendezvous it was given, right after
        return model.bind(timeout=timeout, **options)

    def bind(self, key=None, server_url: str | None = None, timeout: float = 60.0, rendezvous: str | None = None,
             server_token: str | None = None, ca_bundle: str | None = None, party_key: str | None = None,
             reveal: str | None = None, embedding_noise: float | None = None, record_views: bool | None = None,
             device: str | None = None, key_dir: str | None = None):
        """Bind the checkpoint's protocol engine (:data:`hf_secure.engines.PROTOCOLS`): the client key
        and a server for permute, the parties for mpc. Options another protocol takes are refused
        (UnknownOptionError), as are unknown values."""
        engine_class = protocol_engine(self.section["protocol"])
        options = {"key": key, "server_url": server_url, "server_token": server_token, "ca_bundle": ca_bundle,
                   "rendezvous": rendezvous, "party_key": party_key, "reveal": reveal,
                   "embedding_noise": embedding_noise, "record_views": record_views, "device": device,
                   "key_dir": key_dir}
        engine_class.check_options(options)
        if self.engine is not None:  # rebinding: release the servers or parties bound before
            self.engine.close()
            self.engine = None
        self.engine = engine_class.connect(self.folder, self.config, causal=isinstance(self, SecureModelForCausalLM),
                                           dtype=self._client_dtype, timeout=timeout,
                                           **{k: v for k, v in options.items() if k in engine_class.options})
        return self

    def _require_bound(self) -> SecureEngine:
        if self.engine is None:
            raise MissingKeyError(
                "this secure model has no key bound: pass key=PATH to from_pretrained/pipeline, or import it with "
                "`hf-secure keys import PATH`"
            )
        return self.engine

    def secure_report(self) -> dict | None:
        """mpc: the last query's report per role (bytes, messages, rounds, seconds per scope -- one
        scope per layer -- and the dealer's offline bytes and seconds), and ``bounds``: the query's
        leak through the sine protocol's openings and its truncation failure probability (both 0,
        see docs/threat-model.md); None for protocols that report nothing per query."""
        return None if self.engine is None else self.engine.report()

    def save_pretrained(self, save_directory, **kwargs):
        """Copy the converted checkpoint to ``save_directory``: the files ``push_to_hub`` would upload
        (weights, config, model card, tokenizer), never a key or anything else in the folder."""
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        for path in check_uploadable(self.folder):
            shutil.copy2(path, Path(save_directory, path.name))

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the converted checkpoint and its model card; key material is refused."""
        return push_converted(self.folder, repo_id, **kwargs)


# generation settings that leave greedy decoding's choice of token unchanged, and those read only when
# sampling (refused through do_sample); every other setting must keep its default under reveal="token"
_GREEDY_NEUTRAL = {"_from_model_config", "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id",
                   "decoder_start_token_id", "max_length", "max_new_tokens", "max_time", "stop_strings", "use_cache",
                   "return_dict_in_generate", "early_stopping", "length_penalty", "disable_compile", "compile_config",
                   "low_memory",
                   # read only with an assistant model or prompt lookup, both refused in this mode
                   "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
                   "assistant_lookbehind", "target_lookbehind", "max_matching_ngram_size", "is_assistant"}
_SAMPLING_ONLY = {"temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h"}
_NEUTRAL = {"do_sample": (None, False), "num_beams": (None, 1), "num_beam_groups": (None, 1),
            "num_return_sequences": (None, 1),
            "output_scores": (None, False), "output_logits": (None, False),
            "output_attentions": (None, False), "output_hidden_states": (None, False),
            # processors at the value that leaves logits as they are
            "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
            "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
            "min_length": (None, 0), "min_new_tokens": (None, 0), "renormalize_logits": (None, False),
            "remove_invalid_values": (None, False), "guidance_scale": (None, 1.0), "diversity_penalty": (None, 0.0)}
_GENERATE_HOOKS = ("prefix_allowed_tokens_fn", "assistant_model", "negative_prompt_ids",
                   "negative_prompt_attention_mask", "custom_generate", "assistant_tokenizer")


def _same_setting(value, allowed) -> bool:
    """Whether a generation setting equals an allowed value: None and booleans by identity (True is
    not 1), numbers by value (1 == 1.0), anything else by type and value."""
    if value is None or allowed is None or isinstance(value, bool) or isinstance(allowed, bool):
        return value is allowed
    if isinstance(value, (int, float)) and isinstance(allowed, (int, float)):
        return value == allowed
    return type(value) is type(allowed) and value == allowed


def _check_greedy_only(model_config: GenerationConfig, generation_config: GenerationConfig | None, logits_processor,
                       kwargs: dict) -> None:
    """Refuse (UnknownOptionError) any ``generate`` setting that needs logits: the model reveals tokens only.

    Checked on what generate will use: the passed ``generation_config`` with every field it leaves
    unset taken from the model's (as transformers fills them), then the keyword arguments."""
    if logits_processor is not None and len(logits_processor):
        raise UnknownOptionError("logits_processor: a model bound with reveal='token' reveals no logits to process")
    for name in _GENERATE_HOOKS:
        if kwargs.get(name) is not None:
            raise UnknownOptionError(f"{name}: a model bound with reveal='token' decodes greedily only")
    config = copy.deepcopy(model_config)
    if generation_config is not None:
        config.update(**{k: v for k, v in generation_config.to_dict().items() if v is not None})
    config.update(**kwargs)
    defaults = GenerationConfig().to_dict()
    for name, value in config.to_dict().items():
        if name in _GREEDY_NEUTRAL or name in _SAMPLING_ONLY:
            continue
        allowed = _NEUTRAL.get(name, (defaults.get(name),))
        if not any(_same_setting(value, a) for a in allowed):
            raise UnknownOptionError(f"{name}={value!r}: a model bound with reveal='token' decodes greedily only "
                                     f"(the servers reveal each step's most likely token, no logits); "
                                     f"pass do_sample=False and leave the logits processors at their defaults")


def _check_embeds(input_ids, inputs_embeds) -> None:
    if (input_ids is None) == (inputs_embeds is None):
        raise InvalidInputError("pass exactly one of input_ids and inputs_embeds")
    if inputs_embeds is not None and (not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3
                                      or not inputs_embeds.is_floating_point()):
        raise InvalidInputError("inputs_embeds must be a float tensor of shape (batch, sequence, hidden)")


def _batch_and_length(input_ids, inputs_embeds) -> tuple[int, int]:
    tensor = input_ids if input_ids is not None else inputs_embeds
    if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2:
        raise InvalidInputError("pass input_ids (batch, sequence) or inputs_embeds (batch, sequence, hidden)")
    return tuple(tensor.shape[:2])


class SecureModel(SecurePreTrainedModel):
    """Final hidden states (and BERT's pooled output) computed on the server."""

    forward_arguments = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds",
                         "output_attentions", "output_hidden_states", "return_dict")

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        """BERT encoder outputs: ``last_hidden_state`` (batch, sequence, hidden) and ``pooler_output``
        (None under protocols that return the final hidden states only: mpc, fss, he).

        Every argument is checked: integer tensors of shape (batch, sequence) for the masks, ids and
        positions; output flags may only be None or False. Raises InvalidInputError,
        UnknownOptionError (an argument not listed in the signature), MissingKeyError (unbound).
        """
        engine = self._require_bound()
        _refuse_unknown(self, kwargs)
        _check_off(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        _check_bool("return_dict", return_dict)
        if input_ids is not None:
            input_ids = _check_ids(input_ids, engine.vocab_size)
        shape = _batch_and_length(input_ids, inputs_embeds)
        if attention_mask is not None:
            attention_mask = _check_int("attention_mask", attention_mask, shape, high=2, allow_bool=True)
        if token_type_ids is not None:
            token_type_ids = _check_int("token_type_ids", token_type_ids, shape,
                                        high=getattr(self.config, "type_vocab_size", None))
        if position_ids is not None:
            position_ids = _check_int("position_ids", position_ids, shape)
        _check_positions(self.config, self.family, shape[1], position_ids)
        _check_embeds(input_ids, inputs_embeds)
        hidden, pooled = engine.hidden_states(input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids)
        return _as_return(BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled), return_dict)


class SecureModelForCausalLM(SecurePreTrainedModel, GenerationMixin):
    """A causal LM whose transformer runs on the server; ``generate()`` keeps the KV cache there."""

    forward_arguments = ("input_ids", "attention_mask", "position_ids", "cache", "past_key_values",
                         "inputs_embeds", "token_type_ids", "labels", "use_cache", "logits_to_keep",
                         "output_attentions", "output_hidden_states", "return_dict", "tokenizer")

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is created by the first forward, on the server

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, token_type_ids=None, labels=None, use_cache=None, logits_to_keep=0,
                output_attentions=None, output_hidden_states=None, return_dict=None, tokenizer=None, **kwargs):
        """Logits of the new tokens, with the KV cache kept by the server(s).

        Args:
            input_ids: int (batch, new) token ids in [0, vocab); or ``inputs_embeds`` (permute only).
            attention_mask: 0/1 ints (batch, past + new), left padding allowed.
            position_ids: ints (batch, new); None: ``past .. past + new - 1`` as transformers does.
            cache / past_key_values: a :class:`RemoteSessionCache` from an earlier call (either
                name; transformers >= 5.24 says ``cache``), or an empty transformers cache.
            token_type_ids: GPT-2 only: ids (batch, new) embedded with the token table, as GPT-2 does.
            labels: ints (batch, new) for the causal LM loss.
            logits_to_keep: int >= 0 (the last n positions; 0: all) or a 1-D tensor of positions.
            output_attentions / output_hidden_states: None or False only.
            return_dict: False returns a tuple, as transformers does.
            tokenizer: what ``generate(stop_strings=..., tokenizer=...)`` passes along; the stop
                strings are matched by generate on the client, the forward pass does not use it.

        Returns: ``CausalLMOutputWithPast`` with the cache under the installed transformers' name.
        Raises: InvalidInputError (bad tensors), UnknownOptionError (unknown argument, or an option a
            secure model does not offer), MissingKeyError (no key bound), ServerError.
        """
        engine = self._require_bound()
        _refuse_unknown(self, kwargs)
        _check_off(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        _check_bool("return_dict", return_dict)
        _check_bool("use_cache", use_cache)
        cache = one_cache(cache, past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and not isinstance(cache, RemoteSessionCache):
            if not isinstance(cache, Cache):
                raise InvalidInputError(f"the cache must be a transformers Cache, got {type(cache).__name__}")
            if cache.get_seq_length() > 0:
                raise InvalidInputError("a secure model continues only from its own RemoteSessionCache")
            cache = None
        if cache is None and use_cache:
            cache = RemoteSessionCache(engine, engine.open_session())
        if cache is not None and cache.backend is not engine:
            raise ServerError("this cache belongs to another server connection")
        if input_ids is not None:
            input_ids = _check_ids(input_ids, engine.vocab_size)
        batch, new = _batch_and_length(input_ids, inputs_embeds)
        past = cache.length if cache is not None else 0
        if attention_mask is not None:
            attention_mask = _check_int("attention_mask", attention_mask, (batch, past + new), high=2, allow_bool=True)
        if position_ids is not None:
            if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[0] == 1:
                position_ids = position_ids.expand(batch, -1)
            position_ids = _check_int("position_ids", position_ids, (batch, new))
        _check_positions(self.config, self.family, past + new, position_ids)
        if token_type_ids is not None:
            if not self.family.token_types_in_vocab:
                raise UnknownOptionError(f"token_type_ids: a {self.family.name} model has no token types")
            token_type_ids = _check_int("token_type_ids", token_type_ids, (batch, new), high=engine.vocab_size)
        if labels is not None:
            if engine.reveal == "token":
                raise UnknownOptionError("labels: a model bound with reveal='token' has no logits to take a loss of")
            labels = _check_int("labels", labels, (batch, new), low=-100, high=engine.vocab_size)
        if isinstance(logits_to_keep, torch.Tensor):
            logits_to_keep = _check_int("logits_to_keep", logits_to_keep, high=new)
            if logits_to_keep.dim() != 1:
                raise InvalidInputError("logits_to_keep as a tensor must be 1-D positions")
            if engine.reveal == "token":
                raise UnknownOptionError("logits_to_keep as positions: a model bound with reveal='token' reveals the "
                                         "last n positions' tokens only (pass an int)")
            keep = 0
        elif isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool) and logits_to_keep >= 0:
            keep = logits_to_keep
        else:
            raise InvalidInputError(f"logits_to_keep must be an int >= 0 or a 1-D tensor, got {logits_to_keep!r}")
        _check_embeds(input_ids, inputs_embeds)
        logits = engine.logits(input_ids, inputs_embeds, attention_mask, position_ids, cache, keep, token_type_ids)
        return _as_return(self._causal_output(logits, logits_to_keep, labels, cache if use_cache else None),
                          return_dict)

    def generate(self, inputs=None, generation_config=None, logits_processor=None, **kwargs):
        """transformers' ``generate``; with ``reveal="token"`` (mpc) greedy decoding only.

        The servers then reveal each step's most likely token and no logits, so anything that
        would read or reshape logits -- sampling, beams, logits processors (repetition penalty,
        minimum length, bad words, ...), returned scores or logits -- is refused with
        UnknownOptionError instead of silently acting on the point-mass stand-in.
        """
        if self.engine is not None and self.engine.reveal == "token":
            _check_greedy_only(self.generation_config, generation_config, logits_processor, kwargs)
        beams = kwargs.get("num_beams", getattr(generation_config or self.generation_config, "num_beams", 1))
        if beams not in (None, 1):  # refused here, before a query; the cache would refuse it at the first reorder
            raise UnknownOptionError("beam search is not supported with a server-side KV cache; use greedy or sampling")
        return super().generate(inputs, generation_config=generation_config, logits_processor=logits_processor,
                                **kwargs)

    def _causal_output(self, logits, logits_to_keep, labels, cache) -> CausalLMOutputWithPast:
        if not isinstance(logits_to_keep, int):
            logits = logits[:, logits_to_keep]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.engine.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: cache})
