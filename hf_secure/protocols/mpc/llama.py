"""Llama under two-party secret sharing (keys of ``LlamaForCausalLM``, unchanged).

RMSNorm with Goldschmidt's inverse square root; Q/K/V and gate/up fused locally on the shares;
SiLU by the segmented sine series (:func:`.nonlinear.silu`), then one product with ``up``; RoPE is
a public-constant operation (``q cos + rotate_half(q) sin`` with public positions): local, no
communication. ``cos, sin`` come from transformers' own ``LlamaRotaryEmbedding`` for the query's
position ids, so every ``rope_type`` it implements (default, linear, dynamic, yarn, longrope,
llama3, ...) is computed as the plaintext model computes it. Grouped-query attention repeats
key/value heads locally. Cache, masks and head: :mod:`.decoder`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from ...errors import InvalidInputError, UnsupportedModelError
from .approximations import Approximations
from .core import MPC, Shared
from .decoder import DecoderProgram, cached_attention, split_heads
from .layers import linear
from .nonlinear import rms_norm


@dataclass(frozen=True)
class LlamaProgram(DecoderProgram):
    """Every Llama-like family (Llama, Mistral, Qwen2) as a two-party program (:class:`.run.Program`).

    Per layer: RMSNorm, fused Q/K/V (biases where the weights have them), RoPE from transformers'
    own tables (local, then one truncation for queries and keys), grouped-query attention over
    the cached keys and values, the output projection, RMSNorm, the gated MLP with the series SiLU.
    """

    num_heads: int = 1
    num_kv_heads: int = 1
    head_dim: int = 1
    eps: float = 1e-6
    window: int | None = None  # sliding-window attention (Mistral): longer sequences are refused
    rope_config: dict = field(default_factory=dict)  # the config's fields: each process rebuilds the rotary module

    @classmethod
    def from_config(cls, config, approx: Approximations) -> "LlamaProgram":
        """The program of any Llama-like config (Llama, Mistral, Qwen2: :mod:`hf_secure.families`).

        Biases on the projections follow the weights (Qwen2's Q/K/V, ``attention_bias``); a sliding
        window bounds the sequence (:func:`attention_window`). Raises :class:`UnsupportedModelError`
        for MLP biases and for a RoPE variant transformers' Llama rotary module cannot compute at
        full head width."""
        if getattr(config, "mlp_bias", False):
            raise UnsupportedModelError(f"{config.model_type} MLP biases are not supported by the mpc protocol")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "hf_secure")}
        rotary_embedding(fields, head_dim)  # refuse here, not in the parties
        return cls(config.num_hidden_layers, approx, config.num_attention_heads, config.num_key_value_heads,
                   head_dim, config.rms_norm_eps, attention_window(config), fields)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "rotary"}  # each process builds its own

    @cached_property
    def rotary(self):
        """transformers' rotary module, one per process as one per plaintext model: dynamic scaling
        keeps the state transformers keeps (the longest sequence seen so far)."""
        return rotary_embedding(self.rope_config, self.head_dim)

    def derive(self, w: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
        """``*ForCausalLM`` keys to program weights: projections transposed to ``(in, out)``, Q/K/V
        and gate/up concatenated; the LM head is the embedding transposed when tied."""
        def t(name):  # nn.Linear stores (out, in); products want (in, out)
            return w[name].transpose(0, 1).contiguous()

        embed = w["model.embed_tokens.weight"]
        out = {"embed": embed, "lm_head": t("lm_head.weight") if "lm_head.weight" in w else embed.T.contiguous(),
               "final.w": w["model.norm.weight"]}
        matrices = {"embed", "lm_head"}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            qkv = [f"{p}self_attn.{n}_proj" for n in "qkv"]
            out[f"{i}.qkv"] = torch.cat([t(n + ".weight") for n in qkv], dim=1)
            if any(n + ".bias" in w for n in qkv):  # Qwen2, or attention_bias: all three (a missing one raises)
                out[f"{i}.qkv.b"] = torch.cat([w[n + ".bias"] for n in qkv])
            out[f"{i}.o"] = t(p + "self_attn.o_proj.weight")
            if p + "self_attn.o_proj.bias" in w:
                out[f"{i}.o.b"] = w[p + "self_attn.o_proj.bias"]
            out[f"{i}.gate_up"] = torch.cat([t(p + "mlp.gate_proj.weight"), t(p + "mlp.up_proj.weight")], dim=1)
            out[f"{i}.down"] = t(p + "mlp.down_proj.weight")
            out[f"{i}.ln1.w"] = w[p + "input_layernorm.weight"]
            out[f"{i}.ln2.w"] = w[p + "post_attention_layernorm.weight"]
            matrices |= {f"{i}.qkv", f"{i}.o", f"{i}.gate_up", f"{i}.down"}
        return out, matrices

    def embed(self, mpc: MPC, w: dict, onehot: Shared, public: dict) -> Shared:
        """Token rows: one-hot ``[b, s, vocab]`` times the table (one round, no truncation)."""
        return linear(onehot, w["embed"], truncate=False)

    def layer(self, mpc: MPC, w: dict, i: int, h: Shared, keep: torch.Tensor, public: dict, cache):
        """Layer ``i`` on ``h`` ``[b, new, hidden]``; returns ``(h, cache)``."""
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = linear(self._norm(w, h, f"{i}.ln1"), w[f"{i}.qkv"], w.get(f"{i}.qkv.b"))
        cos, sin = public["rope"]
        q, k = mpc.truncate_many([_rope(split_heads(qkv[..., :q_width], self.num_heads), cos, sin),
                                  _rope(split_heads(qkv[..., q_width : q_width + kv_width], self.num_kv_heads), cos, sin)])
        v = split_heads(qkv[..., q_width + kv_width :], self.num_kv_heads)
        context, cache = cached_attention(q, k, v, cache, keep, self.head_dim ** -0.5, self.approx)
        h = h + linear(context, w[f"{i}.o"], w.get(f"{i}.o.b"))
        gate_up = linear(self._norm(w, h, f"{i}.ln2"), w[f"{i}.gate_up"])
        inner = gate_up.shape[-1] // 2
        hidden = self.approx.act(gate_up[..., :inner]) * gate_up[..., inner:]
        return h + linear(hidden, w[f"{i}.down"]), cache

    def check_length(self, length: int) -> None:
        """Past a sliding window the plaintext model attends differently: InvalidInputError (the
        client refuses before sending)."""
        if self.window is not None and length > self.window:
            raise InvalidInputError(f"{length} positions exceed the sliding window of {self.window}")

    def final_norm(self, w: dict, h: Shared) -> Shared:
        """The final RMSNorm before the LM head."""
        return self._norm(w, h, "final")

    def _norm(self, w: dict, x: Shared, site: str) -> Shared:
        return rms_norm(x, w[site + ".w"], self.eps, self.approx.bound(site))

    def with_constants(self, public: dict) -> dict:
        """RoPE's public ``cos, sin`` of shape ``[batch, 1, seq, head_dim]`` for ``position_ids``
        ``[batch, seq]``, from transformers' rotary module, once per query for every layer."""
        cos, sin = self.rotary(torch.empty(0), public["position_ids"])
        return {**public, "rope": (cos.double()[:, None], sin.double()[:, None])}


def attention_window(config) -> int | None:
    """The sliding window of a config's attention (None: full attention in every layer).

    Mistral's ``sliding_window`` applies to every layer; configs with ``layer_types`` (Qwen2) use it
    only where a layer is ``"sliding_attention"``. The mpc program attends over everything, which
    equals the plaintext model while the sequence fits the window, so longer ones are refused."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return window


def rotary_embedding(fields: dict, head_dim: int):
    """transformers' ``LlamaRotaryEmbedding`` for the config ``fields`` (``config.to_dict()``).

    Raises :class:`UnsupportedModelError` when transformers has no such ``rope_type`` or rejects
    its parameters, or when the rotation covers less than ``head_dim`` (partial rotary factor).
    """
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = fields.get("rope_parameters") or fields.get("rope_scaling")
    try:
        rotary = LlamaRotaryEmbedding(LlamaConfig(**fields))
    except (KeyError, ValueError, TypeError) as exc:
        raise UnsupportedModelError(f"RoPE {rope} is not supported by this transformers' Llama rotary "
                                    f"embedding: {exc}") from exc
    if 2 * rotary.inv_freq.numel() != head_dim:
        raise UnsupportedModelError(f"RoPE {rope} rotates {2 * rotary.inv_freq.numel()} of the {head_dim} head "
                                    "dimensions; the mpc protocol needs a full rotation")
    return rotary


def _rope(x: Shared, cos: torch.Tensor, sin: torch.Tensor) -> Shared:
    """``x cos + rotate_half(x) sin`` on shares, local: products with public constants, not yet
    truncated (``2f`` fractional bits; the caller truncates queries and keys in one round)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x.share[..., half:], x.share[..., :half]], dim=-1)
    return x.mul_public(cos, truncate=False) + x.mpc.shared(rotated).mul_public(sin, truncate=False)


def norm_sites(num_layers: int) -> dict[str, str]:
    """A Llama-like model's RMSNorm modules and their site names in ``Approximations.ln_bounds``."""
    sites = {"model.norm": "final"}
    for i in range(num_layers):
        sites[f"model.layers.{i}.input_layernorm"] = f"{i}.ln1"
        sites[f"model.layers.{i}.post_attention_layernorm"] = f"{i}.ln2"
    return sites


def activation_sites(num_layers: int) -> list[tuple[str, str]]:
    """(normalisation, projection) whose output is the activation's input, per layer (:func:`.approximations.activation_input_bound`)."""
    return [(f"model.layers.{i}.post_attention_layernorm", f"model.layers.{i}.mlp.gate_proj") for i in range(num_layers)]
