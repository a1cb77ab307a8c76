"""GPT-2 under two-party secret sharing (keys of ``GPT2LMHeadModel``, unchanged).

Conv1D stores its weights ``(in, out)`` already: products use them as they are (Q/K/V come fused
in ``c_attn``). Positions are learned embeddings looked up by public position ids; the LM head is
the (tied) token embedding, transposed. Cache, masks and head: :mod:`.decoder`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .approximations import Approximations
from .core import MPC, Shared
from .decoder import DecoderProgram, cached_attention, split_heads
from .layers import linear, rows
from .nonlinear import layer_norm


@dataclass(frozen=True)
class GPT2Program(DecoderProgram):
    """GPT-2 as a two-party program (:class:`.run.Program`): the example to start a family from.

    Per layer: LayerNorm (:func:`.nonlinear.layer_norm`), the fused Q/K/V product, attention over
    the cached keys and values (:func:`.decoder.cached_attention`), the output projection, LayerNorm,
    the FFN with SecFormer's GeLU (arXiv 2401.00793, section 4) or MPCFormer's Quad (ICLR 2023).
    Shares are int64 fixed point with ``f`` fractional bits throughout; hidden states are
    ``[batch, seq, hidden]``.
    """

    num_heads: int = 1
    eps: float = 1e-5

    @classmethod
    def from_config(cls, config, approx: Approximations) -> "GPT2Program":
        """The program of a ``GPT2Config`` (unsupported variants are refused by its family spec)."""
        return cls(config.n_layer, approx, config.n_head, config.layer_norm_epsilon)

    def derive(self, w: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
        """``GPT2LMHeadModel`` keys to program weights: Conv1D is ``(in, out)`` already; the LM head
        is the token table transposed unless the checkpoint has its own."""
        p = "transformer."
        embed = w[p + "wte.weight"]
        out = {
            "embed": embed,
            "lm_head": w.get("lm_head.weight", embed).transpose(0, 1).contiguous(),
            "pos": w[p + "wpe.weight"],
            "final.w": w[p + "ln_f.weight"],
            "final.b": w[p + "ln_f.bias"],
        }
        matrices = {"embed", "lm_head"}
        for i in range(self.num_layers):
            b = f"{p}h.{i}."
            for name, key in (("ln1", "ln_1"), ("ln2", "ln_2")):
                out[f"{i}.{name}.w"], out[f"{i}.{name}.b"] = w[b + key + ".weight"], w[b + key + ".bias"]
            for name, key in (("qkv", "attn.c_attn"), ("o", "attn.c_proj"), ("ffn1", "mlp.c_fc"), ("ffn2", "mlp.c_proj")):
                out[f"{i}.{name}"], out[f"{i}.{name}.b"] = w[b + key + ".weight"], w[b + key + ".bias"]
                matrices.add(f"{i}.{name}")
        return out, matrices

    def embed(self, mpc: MPC, w: dict, onehot: Shared, public: dict) -> Shared:
        """Token rows (one-hot ``[b, s, vocab]`` times the table: one round, no truncation) plus the
        position rows of the public ``position_ids`` (local)."""
        return linear(onehot, w["embed"], truncate=False) + rows(mpc, w["pos"], public["position_ids"])

    def layer(self, mpc: MPC, w: dict, i: int, h: Shared, keep: torch.Tensor, public: dict, cache):
        """Layer ``i`` on ``h`` ``[b, new, hidden]`` with the public mask ``keep`` and this layer's
        cache; returns ``(h, cache)``."""
        hidden = h.shape[-1]
        qkv = linear(self._norm(w, h, f"{i}.ln1"), w[f"{i}.qkv"], w[f"{i}.qkv.b"])
        q, k, v = (split_heads(qkv[..., j * hidden : (j + 1) * hidden], self.num_heads) for j in range(3))
        context, cache = cached_attention(q, k, v, cache, keep, 1 / math.sqrt(hidden // self.num_heads), self.approx)
        h = h + linear(context, w[f"{i}.o"], w[f"{i}.o.b"])
        inner = linear(self._norm(w, h, f"{i}.ln2"), w[f"{i}.ffn1"], w[f"{i}.ffn1.b"])
        return h + linear(self.approx.act(inner), w[f"{i}.ffn2"], w[f"{i}.ffn2.b"]), cache

    def final_norm(self, w: dict, h: Shared) -> Shared:
        """``ln_f`` before the LM head."""
        return self._norm(w, h, "final")

    def _norm(self, w: dict, x: Shared, site: str) -> Shared:
        return layer_norm(x, w[site + ".w"], w[site + ".b"], self.eps, self.approx.bound(site))


def norm_sites(num_layers: int) -> dict[str, str]:
    """GPT-2's LayerNorm modules and their site names in ``Approximations.ln_bounds``."""
    sites = {"transformer.ln_f": "final"}
    for i in range(num_layers):
        sites[f"transformer.h.{i}.ln_1"] = f"{i}.ln1"
        sites[f"transformer.h.{i}.ln_2"] = f"{i}.ln2"
    return sites


def activation_sites(num_layers: int) -> list[tuple[str, str]]:
    """(normalisation, projection) whose output is the activation's input, per layer (:func:`.approximations.activation_input_bound`)."""
    return [(f"transformer.h.{i}.ln_2", f"transformer.h.{i}.mlp.c_fc") for i in range(num_layers)]
