"""MPC-friendly models in plaintext: the approximations the mpc protocol computes, as transformers models.

``hf-secure convert approximate`` writes checkpoints of model type ``hf_secure_approx_<family>``
(every family of :mod:`hf_secure.families`): the family's weights under their usual keys, with

* the activation ``"hf_secure_quad_gelu"`` (MPCFormer's Quad, ``0.125 x^2 + 0.25 x + 0.5``),
  ``"hf_secure_secformer_gelu"`` (SecFormer's segmented sine-series erf) or
  ``"hf_secure_series_silu"`` (Llama: segmented sine-series tanh), registered in ``ACT2FN``;
* ``softmax_approximation="2quad"``: MPCFormer's ``(s + 5)^2`` normalised over the unmasked keys,
  registered with the attention and attention-mask interfaces as ``hf_secure_2quad``.

The approximated model runs in plaintext, so its accuracy can be measured (and the model distilled)
without MPC. A process that has not imported hf_secure refuses the model type instead of loading
a model whose activations it does not know.
"""

from __future__ import annotations

import math

import torch
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
)
from transformers.activations import ACT2FN
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from ..families import FAMILIES, FamilySpec
from ..protocols.mpc.nonlinear import (
    ERF_CUT,
    ERF_PERIOD,
    ERF_SINE_COEFFS,
    SILU_CUT,
    TANH_HALF_PERIOD,
    TANH_HALF_SINE_COEFFS,
)

TWO_QUAD = "hf_secure_2quad"
TWO_QUAD_SHIFT = 5.0


class QuadGELU(torch.nn.Module):
    """MPCFormer's GeLU replacement."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.125 * x * x + 0.25 * x + 0.5


def _segmented_series(u: torch.Tensor, coeffs, period: int, cut: float) -> torch.Tensor:
    """``-1`` / ``sum_k b_k sin(2 pi k u / period)`` / ``+1`` for ``u < -cut`` / between / ``u >= cut``."""
    series = sum(b * torch.sin(2 * math.pi * k * u / period) for k, b in enumerate(coeffs, 1))
    return torch.where(u < -cut, -1.0, torch.where(u >= cut, 1.0, series))


class SecFormerGELU(torch.nn.Module):
    """``0.5 x (1 + erf(x / sqrt 2))`` with SecFormer's segmented sine-series erf."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + _segmented_series(x / math.sqrt(2), ERF_SINE_COEFFS, ERF_PERIOD, ERF_CUT))


class SeriesSiLU(torch.nn.Module):
    """``x sigmoid(x) = 0.5 x (1 + tanh(x / 2))`` with a segmented sine-series tanh."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + _segmented_series(x, TANH_HALF_SINE_COEFFS, TANH_HALF_PERIOD, SILU_CUT))


def two_quad_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention with 2Quad in place of softmax; ``attention_mask`` is the additive eager mask."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    groups = query.shape[1] // key.shape[1]  # grouped-query attention
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    keep = torch.ones_like(scores) if attention_mask is None else (attention_mask == 0).to(scores.dtype)
    quad = (scores + TWO_QUAD_SHIFT) ** 2 * keep
    probs = quad / quad.sum(-1, keepdim=True)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class _ApproxConfig:
    """Mixin: the softmax replacement (``"2quad"`` or ``"exact"``) selects the attention function."""

    softmax_approximation: str = "2quad"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.softmax_approximation == "2quad":
            self._attn_implementation = TWO_QUAD


def approximated(spec: FamilySpec) -> tuple[type, type]:
    """The MPC-friendly twin of a family's config and model classes: model type
    ``spec.approx_model_type``, the softmax replacement selected by the config (:class:`_ApproxConfig`),
    everything else -- weights, keys, forward -- the family's own. Built once per family."""
    if spec.name not in _TWINS:
        config_class = type(f"Approx{spec.config_class.__name__}", (_ApproxConfig, spec.config_class),
                            {"model_type": spec.approx_model_type, "__module__": __name__})
        model_class = type(f"Approx{spec.model_class.__name__}", (spec.model_class,),
                           {"config_class": config_class, "__module__": __name__})
        _TWINS[spec.name] = (config_class, model_class)
    return _TWINS[spec.name]


_TWINS: dict[str, tuple[type, type]] = {}


def register_approximations() -> None:
    ACT2FN["hf_secure_quad_gelu"] = QuadGELU
    ACT2FN["hf_secure_secformer_gelu"] = SecFormerGELU
    ACT2FN["hf_secure_series_silu"] = SeriesSiLU
    AttentionInterface.register(TWO_QUAD, two_quad_attention)
    AttentionMaskInterface.register(TWO_QUAD, eager_mask)
    for spec in FAMILIES.values():
        config_class, model_class = approximated(spec)
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        (AutoModelForCausalLM if spec.causal else AutoModel).register(config_class, model_class, exist_ok=True)
