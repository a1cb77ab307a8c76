"""MPC-friendly BERT in plaintext: the approximations the mpc protocol computes, as a transformers model.

``hf-secure convert approximate`` writes checkpoints of model type ``hf_secure_approx_bert``:
BERT's weights under their usual keys, with

* ``hidden_act="hf_secure_quad_gelu"`` (MPCFormer's Quad, ``0.125 x^2 + 0.25 x + 0.5``) or
  ``"hf_secure_secformer_gelu"`` (SecFormer's segmented sine-series erf), registered in ``ACT2FN``;
* ``softmax_approximation="2quad"``: MPCFormer's ``(s + 5)^2`` normalised over the unmasked keys,
  registered with the attention and attention-mask interfaces as ``hf_secure_2quad``.

The approximated model runs in plaintext, so its accuracy can be measured (and the model distilled)
without MPC. A process that has not imported hf_secure refuses the model type instead of loading
a model whose activations it does not know.
"""

from __future__ import annotations

import math

import torch
from transformers import AttentionInterface, AutoConfig, AutoModel, BertConfig, BertModel
from transformers.activations import ACT2FN
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from ..protocols.mpc.nonlinear import ERF_SINE_COEFFS, ERF_PERIOD

TWO_QUAD = "hf_secure_2quad"
TWO_QUAD_SHIFT = 5.0


class QuadGELU(torch.nn.Module):
    """MPCFormer's GeLU replacement."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.125 * x * x + 0.25 * x + 0.5


class SecFormerGELU(torch.nn.Module):
    """``0.5 x (1 + erf(x / sqrt 2))`` with SecFormer's erf: -1, sine series, +1 on u < -2.5, between, >= 2.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x / math.sqrt(2)
        series = sum(b * torch.sin(2 * math.pi * k * u / ERF_PERIOD) for k, b in enumerate(ERF_SINE_COEFFS, 1))
        erf = torch.where(u < -2.5, -1.0, torch.where(u >= 2.5, 1.0, series))
        return 0.5 * x * (1 + erf)


def two_quad_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention with 2Quad in place of softmax; ``attention_mask`` is the additive eager mask."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    keep = torch.ones_like(scores) if attention_mask is None else (attention_mask == 0).to(scores.dtype)
    quad = (scores + TWO_QUAD_SHIFT) ** 2 * keep
    probs = quad / quad.sum(-1, keepdim=True)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class ApproxBertConfig(BertConfig):
    model_type = "hf_secure_approx_bert"
    softmax_approximation: str = "2quad"  # "2quad" or "exact"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.softmax_approximation == "2quad":
            self._attn_implementation = TWO_QUAD


class ApproxBertModel(BertModel):
    config_class = ApproxBertConfig


def register_approximations() -> None:
    ACT2FN["hf_secure_quad_gelu"] = QuadGELU
    ACT2FN["hf_secure_secformer_gelu"] = SecFormerGELU
    AttentionInterface.register(TWO_QUAD, two_quad_attention)
    AttentionMaskInterface.register(TWO_QUAD, eager_mask)
    AutoConfig.register(ApproxBertConfig.model_type, ApproxBertConfig, exist_ok=True)
    AutoModel.register(ApproxBertConfig, ApproxBertModel, exist_ok=True)
