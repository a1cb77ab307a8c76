"""Secure pipelines, registered with transformers' pipeline registry on ``import hf_secure``.

``pipeline("secure-text-generation", model=DIR, key=KEYFILE)`` and
``pipeline("secure-feature-extraction", model=DIR, key=KEYFILE)`` behave like their plain
counterparts. ``key`` may be omitted once the key is in the local key store
(``hf-secure keys import``); ``server_url`` reaches ``hf-secure serve`` instead of running the
server part in this process (``server_token`` and ``ca_bundle`` as in ``from_pretrained``);
``timeout`` bounds every server call. ``protocol="mpc"`` runs a
``hf-secure convert approximate`` checkpoint through two-party secret sharing
(``secure-feature-extraction`` for BERT, ``secure-text-generation`` for GPT-2 and Llama), every
party on this machine, or with ``rendezvous="tcp://HOST:PORT"`` only the client (the other parties
started with ``hf-secure party``); ``reveal="token"`` (mpc, text generation) lets the client learn
only each generated token, not its logits. ``protocol="fss"`` runs a plain transformers checkpoint
(BERT, GPT-2, Llama-like) through function secret sharing, unmodified (``device="cuda"``: the
servers compute on the GPU); ``protocol="he"`` runs a plain BERT checkpoint under CKKS
(``secure-feature-extraction``; the client's secret key in the local key store).
"""

from __future__ import annotations

from types import SimpleNamespace

from transformers import FeatureExtractionPipeline, GenerationConfig, TextGenerationPipeline
from transformers.pipelines import PIPELINE_REGISTRY

from ..engines import protocol_engine
from ..errors import UnknownOptionError
from ..modeling import SecureModel, SecureModelForCausalLM
from ..server.runtime import PLAIN_PROTOCOLS, read_section


class _SecurePipelineMixin:
    """Binds the key and server to the model that ``pipeline()`` loaded, and refuses plain models."""

    secure_model_class: type

    def __init__(self, *args, key=None, server_url=None, server_token=None, ca_bundle=None, timeout: float = 60.0,
                 protocol: str | None = None, rendezvous: str | None = None, party_key: str | None = None,
                 reveal: str | None = None, embedding_noise: float | None = None, device: str | None = None,
                 key_dir: str | None = None, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        bound = getattr(getattr(model, "engine", None), "reveal", None)
        defaults = getattr(self, "_default_generation_config", None)
        if "token" in (reveal, bound) and defaults is not None:
            # a model that reveals only tokens decodes greedily: the pipeline's sampling default would be refused
            self._default_generation_config = GenerationConfig(
                **{**defaults.to_diff_dict(), "do_sample": False, "temperature": None})
        super().__init__(*args, **kwargs)
        self.check_model_type(None)
        if self.model.section.get("plain"):  # a plain checkpoint: fss or he run it as it is
            if protocol not in PLAIN_PROTOCOLS:  # says how to convert it, or which protocols to pass
                read_section(SimpleNamespace(), str(self.model.folder), protocol)
            self.model.section["protocol"] = protocol
        recorded = self.model.section["protocol"]
        if protocol is not None:
            protocol_engine(protocol)  # an unknown name: UnknownOptionError listing the registered ones
        if protocol is not None and protocol != recorded:
            raise UnknownOptionError(f"{self.model.folder} was converted for protocol {recorded!r}, not {protocol!r}")
        options = {"key": key, "server_url": server_url, "server_token": server_token, "ca_bundle": ca_bundle,
                   "rendezvous": rendezvous, "party_key": party_key, "reveal": reveal,
                   "embedding_noise": embedding_noise, "device": device, "key_dir": key_dir}
        if self.model.engine is None:
            self.model.bind(timeout=timeout, **options)
        elif any(value is not None for value in options.values()):
            raise UnknownOptionError("the model is already bound to a key and server; pass key/server_url once")

    def check_model_type(self, supported_models):
        if not isinstance(self.model, self.secure_model_class):
            raise UnknownOptionError(
                f"{self.task or 'this pipeline'} needs a {self.secure_model_class.__name__} (a converted checkpoint), "
                f"got {type(self.model).__name__}"
            )

    @property
    def secure_stats(self) -> dict:
        """Rounds, bytes each way and server time since the model was bound."""
        return self.model.engine.stats.snapshot()


class SecureTextGenerationPipeline(_SecurePipelineMixin, TextGenerationPipeline):
    secure_model_class = SecureModelForCausalLM


class SecureFeatureExtractionPipeline(_SecurePipelineMixin, FeatureExtractionPipeline):
    secure_model_class = SecureModel


def register_pipelines() -> None:
    PIPELINE_REGISTRY.register_pipeline(
        "secure-text-generation",
        pipeline_class=SecureTextGenerationPipeline,
        pt_model=SecureModelForCausalLM,
        type="text",
    )
    PIPELINE_REGISTRY.register_pipeline(
        "secure-feature-extraction",
        pipeline_class=SecureFeatureExtractionPipeline,
        pt_model=SecureModel,
        type="text",
    )


__all__ = ["SecureFeatureExtractionPipeline", "SecureTextGenerationPipeline", "register_pipelines"]
