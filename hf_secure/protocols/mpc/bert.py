"""BERT encoders under two-party secret sharing (SecFormer's protocols, MPCFormer's approximations).

Weights keep their transformers state-dict keys; the servers re-lay them out locally (transpose
to (in, out), fuse Q/K/V) before the masked matrices are opened once at setup. Private input:
one-hot rows of the token ids (shared by the client). Public: positions, token types and the
padding mask (the sequence length is public in every protocol here).

Approximations (GeLU, softmax, LayerNorm bounds): :mod:`.approximations`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .approximations import Approximations, scope
from .core import MPC, Shared
from .layers import linear, rows
from .nonlinear import layer_norm


@dataclass(frozen=True)
class BertProgram:
    """The BERT encoder as a two-party program (see :func:`hf_secure.protocols.mpc.run.run_program`)."""

    num_layers: int
    num_heads: int
    eps: float
    approx: Approximations = Approximations()
    from_embeddings: bool = False  # input: the embeddings' output instead of one-hot token ids

    @classmethod
    def from_config(cls, config, approx: Approximations = Approximations(), from_embeddings: bool = False):
        """The program of a ``BertConfig``; ``from_embeddings``: the input is the embeddings' output
        ``[b, s, hidden]`` (fixed point) instead of one-hot token rows."""
        return cls(config.num_hidden_layers, config.num_attention_heads, config.layer_norm_eps, approx,
                   from_embeddings)

    def derive(self, w: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
        """``BertModel`` keys to program weights: projections transposed to ``(in, out)``, Q/K/V
        concatenated (the pooler is not computed)."""
        def t(name):  # nn.Linear stores (out, in); products want (in, out)
            return w[name].transpose(0, 1).contiguous()

        out, matrices = {}, set()
        if not self.from_embeddings:
            out = {
                "embed": w["embeddings.word_embeddings.weight"],
                "pos": w["embeddings.position_embeddings.weight"],
                "type": w["embeddings.token_type_embeddings.weight"],
                "emb_ln.w": w["embeddings.LayerNorm.weight"],
                "emb_ln.b": w["embeddings.LayerNorm.bias"],
            }
            matrices = {"embed"}
        for i in range(self.num_layers):
            p = f"encoder.layer.{i}."
            qkv = [f"{p}attention.self.{n}" for n in ("query", "key", "value")]
            out[f"{i}.qkv"] = torch.cat([t(n + ".weight") for n in qkv], dim=1)
            out[f"{i}.qkv.b"] = torch.cat([w[n + ".bias"] for n in qkv])
            out[f"{i}.o"], out[f"{i}.o.b"] = t(p + "attention.output.dense.weight"), w[p + "attention.output.dense.bias"]
            out[f"{i}.ln1.w"], out[f"{i}.ln1.b"] = w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"]
            out[f"{i}.ffn1"], out[f"{i}.ffn1.b"] = t(p + "intermediate.dense.weight"), w[p + "intermediate.dense.bias"]
            out[f"{i}.ffn2"], out[f"{i}.ffn2.b"] = t(p + "output.dense.weight"), w[p + "output.dense.bias"]
            out[f"{i}.ln2.w"], out[f"{i}.ln2.b"] = w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]
            matrices |= {f"{i}.qkv", f"{i}.o", f"{i}.ffn1", f"{i}.ffn2"}
        return out, matrices

    def forward(self, mpc: MPC, w: dict, inputs: list[Shared], public: dict, state: dict) -> list[Shared]:
        """Final hidden states ``[b, s, hidden]`` of one-hot rows (or embeddings); public fields
        ``attention_mask``, ``position_ids``, ``token_type_ids``, all ``[b, s]``."""
        (h,) = inputs
        mask = public["attention_mask"]
        if not self.from_embeddings:  # h is one-hot token ids
            h = linear(h, w["embed"], truncate=False)
            h = h + rows(mpc, w["pos"], public["position_ids"]) + rows(mpc, w["type"], public["token_type_ids"])
            h = self._layer_norm(h, w["emb_ln.w"], w["emb_ln.b"], "embeddings")
        for i in range(self.num_layers):
            with scope(mpc, f"layer.{i}"):
                h = self._layer(mpc, w, i, h, mask)
                mpc.see("output share", h.share)
        return [h]

    def _layer(self, mpc: MPC, w: dict, i: int, h: Shared, mask: torch.Tensor) -> Shared:
        batch, seq, hidden = h.shape
        heads, head_dim = self.num_heads, hidden // self.num_heads
        qkv = linear(h, w[f"{i}.qkv"], w[f"{i}.qkv.b"])

        def split(k):  # [b, s, 3d] -> [b, heads, s, head_dim]
            return qkv[..., k * hidden : (k + 1) * hidden].reshape(batch, seq, heads, head_dim).transpose(1, 2)

        q, k, v = split(0), split(1), split(2)
        (scores,) = mpc.products([(q, k.transpose(2, 3))], torch.matmul, scale=1 / math.sqrt(head_dim))
        probs = self.approx.attention_probs(scores, mask[:, None, None, :].to(torch.int64))
        (context,) = mpc.products([(probs, v)], torch.matmul)
        context = context.transpose(1, 2).reshape(batch, seq, hidden)
        h = self._layer_norm(linear(context, w[f"{i}.o"], w[f"{i}.o.b"]) + h, w[f"{i}.ln1.w"], w[f"{i}.ln1.b"], f"{i}.ln1")
        inner = linear(h, w[f"{i}.ffn1"], w[f"{i}.ffn1.b"])
        out = linear(self.approx.act(inner), w[f"{i}.ffn2"], w[f"{i}.ffn2.b"])
        return self._layer_norm(out + h, w[f"{i}.ln2.w"], w[f"{i}.ln2.b"], f"{i}.ln2")

    def _layer_norm(self, x: Shared, weight: Shared, bias: Shared, site: str) -> Shared:
        return layer_norm(x, weight, bias, self.eps, self.approx.bound(site))


def norm_sites(num_layers: int) -> dict[str, str]:
    """BERT's LayerNorm modules and their site names in ``Approximations.ln_bounds``."""
    sites = {"embeddings.LayerNorm": "embeddings"}
    for i in range(num_layers):
        sites[f"encoder.layer.{i}.attention.output.LayerNorm"] = f"{i}.ln1"
        sites[f"encoder.layer.{i}.output.LayerNorm"] = f"{i}.ln2"
    return sites


def activation_sites(num_layers: int) -> list[tuple[str, str]]:
    """(normalisation, projection) whose output is the activation's input, per layer (:func:`.approximations.activation_input_bound`)."""
    return [(f"encoder.layer.{i}.attention.output.LayerNorm", f"encoder.layer.{i}.intermediate.dense") for i in range(num_layers)]
