"""Model families: one spec per transformers ``model_type``, read by every protocol and converter.

A family is what hf_secure must know about a transformers architecture, in one place:

* ``rules`` -- the permute protocol's weight rules: a regex on each state-dict key and the axes it
  permutes (``{n}`` is the layer index); a key no rule covers is refused
  (:mod:`.protocols.permute.rewrite`).
* ``program`` -- the mpc protocol's two-party program class (:class:`.protocols.mpc.run.Program`),
  with the modules whose statistics bound the normalisations (``norm_sites``) and whose outputs
  feed the activation (``activation_sites``).
* ``config_class`` / ``model_class`` -- transformers' classes, of which
  :mod:`.modeling.approximate` derives the MPC-friendly twins (model type ``approx_model_type``).
* ``activations`` and ``activation_field`` -- which approximated activations the family admits and
  the config field that names the activation.
* ``refuse(config)`` -- the variants of the architecture the protocols do not compute (raises
  :class:`~hf_secure.errors.UnsupportedModelError`).

A Llama-like family (Mistral, Qwen2) is one entry: the maths is Llama's, and what differs (biases
on Q/K/V, a sliding window) is read from the config and the weights' names. To add a family, add a
:class:`FamilySpec` to :data:`FAMILIES`; the permute and mpc protocols, the converters, the
drop-in models and the conformance test (``tests/test_conformance.py``) then cover it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from .errors import UnsupportedModelError
from .protocols.mpc import bert, gpt2, llama

# Rules: (regex on the state-dict key, {axis: permutation name}). ``{n}`` marks the layer index.
# A permutation name resolves either globally ("hidden", "vocab") or per layer ("q", "k", "v",
# "o_in", "qkv", "ffn").
_GPT2_RULES = [
    (r"wte\.weight", {0: "vocab", 1: "hidden"}),
    (r"wpe\.weight", {1: "hidden"}),
    (r"h\.{n}\.ln_[12]\.(weight|bias)", {0: "hidden"}),
    (r"ln_f\.(weight|bias)", {0: "hidden"}),
    (r"h\.{n}\.attn\.c_attn\.weight", {0: "hidden", 1: "qkv"}),
    (r"h\.{n}\.attn\.c_attn\.bias", {0: "qkv"}),
    (r"h\.{n}\.attn\.c_proj\.weight", {0: "o_in", 1: "hidden"}),
    (r"h\.{n}\.attn\.c_proj\.bias", {0: "hidden"}),
    (r"h\.{n}\.mlp\.c_fc\.weight", {0: "hidden", 1: "ffn"}),
    (r"h\.{n}\.mlp\.c_fc\.bias", {0: "ffn"}),
    (r"h\.{n}\.mlp\.c_proj\.weight", {0: "ffn", 1: "hidden"}),
    (r"h\.{n}\.mlp\.c_proj\.bias", {0: "hidden"}),
    (r"lm_head\.weight", {0: "vocab", 1: "hidden"}),
]

_BERT_RULES = [
    (r"embeddings\.word_embeddings\.weight", {0: "vocab", 1: "hidden"}),
    (r"embeddings\.(position|token_type)_embeddings\.weight", {1: "hidden"}),
    (r"embeddings\.LayerNorm\.(weight|bias)", {0: "hidden"}),
    (r"layer\.{n}\.attention\.self\.query\.weight", {0: "q", 1: "hidden"}),
    (r"layer\.{n}\.attention\.self\.query\.bias", {0: "q"}),
    (r"layer\.{n}\.attention\.self\.key\.weight", {0: "k", 1: "hidden"}),
    (r"layer\.{n}\.attention\.self\.key\.bias", {0: "k"}),
    (r"layer\.{n}\.attention\.self\.value\.weight", {0: "v", 1: "hidden"}),
    (r"layer\.{n}\.attention\.self\.value\.bias", {0: "v"}),
    (r"layer\.{n}\.attention\.output\.dense\.weight", {0: "hidden", 1: "o_in"}),
    (r"layer\.{n}\.attention\.output\.dense\.bias", {0: "hidden"}),
    (r"layer\.{n}\.(attention\.)?output\.LayerNorm\.(weight|bias)", {0: "hidden"}),
    (r"layer\.{n}\.intermediate\.dense\.weight", {0: "ffn", 1: "hidden"}),
    (r"layer\.{n}\.intermediate\.dense\.bias", {0: "ffn"}),
    (r"layer\.{n}\.output\.dense\.weight", {0: "hidden", 1: "ffn"}),
    (r"layer\.{n}\.output\.dense\.bias", {0: "hidden"}),
    (r"pooler\.dense\.weight", {0: "hidden", 1: "hidden"}),
    (r"pooler\.dense\.bias", {0: "hidden"}),
]

_LLAMA_RULES = [
    (r"embed_tokens\.weight", {0: "vocab", 1: "hidden"}),
    (r"layers\.{n}\.self_attn\.q_proj\.weight", {0: "q", 1: "hidden"}),
    (r"layers\.{n}\.self_attn\.q_proj\.bias", {0: "q"}),
    (r"layers\.{n}\.self_attn\.k_proj\.weight", {0: "k", 1: "hidden"}),
    (r"layers\.{n}\.self_attn\.k_proj\.bias", {0: "k"}),
    (r"layers\.{n}\.self_attn\.v_proj\.weight", {0: "v", 1: "hidden"}),
    (r"layers\.{n}\.self_attn\.v_proj\.bias", {0: "v"}),
    (r"layers\.{n}\.self_attn\.o_proj\.weight", {0: "hidden", 1: "o_in"}),
    (r"layers\.{n}\.self_attn\.o_proj\.bias", {0: "hidden"}),
    (r"layers\.{n}\.mlp\.(gate|up)_proj\.weight", {0: "ffn", 1: "hidden"}),
    (r"layers\.{n}\.mlp\.(gate|up)_proj\.bias", {0: "ffn"}),
    (r"layers\.{n}\.mlp\.down_proj\.weight", {0: "hidden", 1: "ffn"}),
    (r"layers\.{n}\.mlp\.down_proj\.bias", {0: "hidden"}),
    (r"layers\.{n}\.(input|post_attention)_layernorm\.weight", {0: "hidden"}),
    (r"norm\.weight", {0: "hidden"}),
    (r"lm_head\.weight", {0: "vocab", 1: "hidden"}),
]


def _refuse_nothing(config) -> None:
    return None


def _refuse_gpt2(config) -> None:
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
        raise UnsupportedModelError("GPT-2 variants with layer-scaled or upcast attention are not supported")
    if not getattr(config, "scale_attn_weights", True):
        raise UnsupportedModelError("GPT-2 without the 1/sqrt(head_dim) attention scaling is not supported")


def _refuse_llama_like(config) -> None:
    if config.hidden_act != "silu" and not config.hidden_act.startswith("hf_secure_"):
        raise UnsupportedModelError(f"{config.model_type} with activation {config.hidden_act!r} (only SiLU is supported)")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedModelError(f"{config.model_type} MLP biases are not supported by the mpc and fss protocols")


@dataclass(frozen=True)
class FamilySpec:
    """How hf_secure sees one transformers model family (see the module docstring)."""

    name: str  # recorded in converted checkpoints (``config.hf_secure["family"]``)
    model_type: str  # transformers' model_type of the plain checkpoints
    config_class: type
    model_class: type
    causal: bool
    rope: bool  # rotary positions (no learned position table, no position limit of its own)
    token_types_in_vocab: bool  # GPT-2 embeds token_type_ids with the token table
    embedding_key: str  # suffix of the token-embedding weight in the state dict
    rules: list
    program: type
    norm_sites: Callable[[int], dict[str, str]]
    activation_sites: Callable[[int], list[tuple[str, str]]]
    activations: tuple[str, ...]  # approximated activations it admits, the default first
    activation_field: str  # the config field naming the activation
    refuse: Callable = _refuse_nothing

    @property
    def approx_model_type(self) -> str:
        """The model type of the family's MPC-friendly twin (``hf-secure convert approximate``)."""
        return f"hf_secure_approx_{self.name}"


def _llama_like(name: str, model_type: str, config_class: type, model_class: type) -> FamilySpec:
    """A family whose maths is Llama's (RMSNorm, RoPE, gated SiLU MLP, grouped-query attention)."""
    return FamilySpec(name, model_type, config_class, model_class, causal=True, rope=True,
                      token_types_in_vocab=False, embedding_key="embed_tokens.weight", rules=_LLAMA_RULES,
                      program=llama.LlamaProgram, norm_sites=llama.norm_sites, activation_sites=llama.activation_sites,
                      activations=("series_silu",), activation_field="hidden_act", refuse=_refuse_llama_like)


FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (
    FamilySpec("bert", "bert", BertConfig, BertModel, causal=False, rope=False, token_types_in_vocab=False,
               embedding_key="word_embeddings.weight", rules=_BERT_RULES, program=bert.BertProgram,
               norm_sites=bert.norm_sites, activation_sites=bert.activation_sites,
               activations=("secformer_gelu", "quad_gelu"), activation_field="hidden_act"),
    FamilySpec("gpt2", "gpt2", GPT2Config, GPT2LMHeadModel, causal=True, rope=False, token_types_in_vocab=True,
               embedding_key="wte.weight", rules=_GPT2_RULES, program=gpt2.GPT2Program,
               norm_sites=gpt2.norm_sites, activation_sites=gpt2.activation_sites,
               activations=("secformer_gelu", "quad_gelu"), activation_field="activation_function",
               refuse=_refuse_gpt2),
    _llama_like("llama", "llama", LlamaConfig, LlamaForCausalLM),
    _llama_like("mistral", "mistral", MistralConfig, MistralForCausalLM),
    _llama_like("qwen2", "qwen2", Qwen2Config, Qwen2ForCausalLM),
)}


def family(name: str) -> FamilySpec:
    """The family recorded in a converted checkpoint (``config.hf_secure["family"]``)."""
    if name not in FAMILIES:
        raise UnsupportedModelError(f"unknown model family {name!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(config) -> FamilySpec:
    """The family of a transformers config: plain (``model_type``) or approximated
    (``hf_secure_approx_<family>``). Raises UnsupportedModelError for any other model type."""
    model_type = getattr(config, "model_type", None)
    for spec in FAMILIES.values():
        if model_type in (spec.model_type, spec.approx_model_type):
            return spec
    raise UnsupportedModelError(f"supported model types: {sorted(s.model_type for s in FAMILIES.values())}; "
                                f"got {model_type!r}")
