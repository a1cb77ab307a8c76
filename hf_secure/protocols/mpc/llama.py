"""Llama under two-party secret sharing (keys of ``LlamaForCausalLM``, unchanged).

RMSNorm with Goldschmidt's inverse square root; Q/K/V and gate/up fused locally on the shares;
SiLU by the segmented sine series (:func:`.nonlinear.silu`), then one product with ``up``; RoPE is
a public-constant operation (``q cos + rotate_half(q) sin`` with public positions): local, no
communication. Grouped-query attention repeats key/value heads locally. Cache, masks and head:
:mod:`.decoder`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import UnsupportedModelError
from .approximations import Approximations
from .core import MPC, Shared
from .decoder import DecoderProgram, cached_attention, split_heads
from .layers import linear
from .nonlinear import rms_norm


@dataclass(frozen=True)
class LlamaProgram(DecoderProgram):
    num_heads: int = 1
    num_kv_heads: int = 1
    head_dim: int = 1
    eps: float = 1e-6
    inv_freq: tuple = ()  # RoPE's inverse frequencies (from transformers' rope initialisation)
    rope_scaling: float = 1.0
    has_bias: bool = False

    @classmethod
    def from_config(cls, config, approx: Approximations) -> "LlamaProgram":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        if getattr(config, "mlp_bias", False):
            raise UnsupportedModelError("Llama MLP biases are not supported by the mpc protocol")
        rotary = LlamaRotaryEmbedding(config)
        if rotary.rope_type == "dynamic":
            raise UnsupportedModelError("dynamic RoPE scaling is not supported by the mpc protocol")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, approx, config.num_attention_heads, config.num_key_value_heads,
                   head_dim, config.rms_norm_eps, tuple(rotary.inv_freq.tolist()), float(rotary.attention_scaling),
                   bool(getattr(config, "attention_bias", False)))

    def derive(self, w: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
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
            if self.has_bias:
                out[f"{i}.qkv.b"] = torch.cat([w[n + ".bias"] for n in qkv])
            out[f"{i}.o"] = t(p + "self_attn.o_proj.weight")
            if self.has_bias:
                out[f"{i}.o.b"] = w[p + "self_attn.o_proj.bias"]
            out[f"{i}.gate_up"] = torch.cat([t(p + "mlp.gate_proj.weight"), t(p + "mlp.up_proj.weight")], dim=1)
            out[f"{i}.down"] = t(p + "mlp.down_proj.weight")
            out[f"{i}.ln1.w"] = w[p + "input_layernorm.weight"]
            out[f"{i}.ln2.w"] = w[p + "post_attention_layernorm.weight"]
            matrices |= {f"{i}.qkv", f"{i}.o", f"{i}.gate_up", f"{i}.down"}
        return out, matrices

    def embed(self, mpc: MPC, w: dict, onehot: Shared, public: dict) -> Shared:
        return linear(onehot, w["embed"], truncate=False)

    def layer(self, mpc: MPC, w: dict, i: int, h: Shared, keep: torch.Tensor, public: dict, cache):
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = linear(self._norm(w, h, f"{i}.ln1"), w[f"{i}.qkv"], w.get(f"{i}.qkv.b"))
        cos, sin = public["rope"]
        q = _rope(split_heads(qkv[..., :q_width], self.num_heads), cos, sin)
        k = _rope(split_heads(qkv[..., q_width : q_width + kv_width], self.num_kv_heads), cos, sin)
        v = split_heads(qkv[..., q_width + kv_width :], self.num_kv_heads)
        context, cache = cached_attention(q, k, v, cache, keep, self.head_dim ** -0.5, self.approx)
        h = h + linear(context, w[f"{i}.o"], w.get(f"{i}.o.b"))
        gate_up = linear(self._norm(w, h, f"{i}.ln2"), w[f"{i}.gate_up"])
        inner = gate_up.shape[-1] // 2
        hidden = self.approx.act(gate_up[..., :inner]) * gate_up[..., inner:]
        return h + linear(hidden, w[f"{i}.down"]), cache

    def final_norm(self, w: dict, h: Shared) -> Shared:
        return self._norm(w, h, "final")

    def _norm(self, w: dict, x: Shared, site: str) -> Shared:
        return rms_norm(x, w[site + ".w"], self.eps, self.approx.bound(site))

    def with_constants(self, public: dict) -> dict:
        """RoPE's public ``cos, sin`` of shape ``[batch, 1, seq, head_dim]`` (as transformers computes
        them), once per query for every layer."""
        freqs = public["position_ids"][..., None].float() * torch.tensor(self.inv_freq, dtype=torch.float32)
        angles = torch.cat([freqs, freqs], dim=-1)
        rope = ((angles.cos() * self.rope_scaling).double()[:, None], (angles.sin() * self.rope_scaling).double()[:, None])
        return {**public, "rope": rope}


def _rope(x: Shared, cos: torch.Tensor, sin: torch.Tensor) -> Shared:
    """``x cos + rotate_half(x) sin`` on shares: products with public constants, no communication."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x.share[..., half:], x.share[..., :half]], dim=-1)
    return x.mul_public(cos) + x.mpc.shared(rotated).mul_public(sin)


def norm_sites(num_layers: int) -> dict[str, str]:
    sites = {"model.norm": "final"}
    for i in range(num_layers):
        sites[f"model.layers.{i}.input_layernorm"] = f"{i}.ln1"
        sites[f"model.layers.{i}.post_attention_layernorm"] = f"{i}.ln2"
    return sites

