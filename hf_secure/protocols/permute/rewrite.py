"""Weight rewriting for the permute protocol (STIP).

Notation: a permutation is an index vector ``p`` and "permuting x by p" means ``x[..., p]``
(row-vector convention, ``x' = x Pi``). For a layer ``y = x W + b`` whose input is permuted by
``p_in`` and whose output must come out permuted by ``p_out``, the rewritten weights are
``W' = W[p_in][:, p_out]`` and ``b' = b[p_out]``; then ``x' W' + b' = (x W + b)[p_out]``. With
nn.Linear the weight is stored transposed (out, in), so the axes swap; GPT-2's Conv1D stores
(in, out).

What gets permuted (STIP's theorem ``f'(x Pi) = f(x) Pi`` extended by free internal symmetries):

* ``hidden`` -- the residual stream, everywhere it appears: every projection reading or writing
  it, every LayerNorm/RMSNorm weight and bias (LayerNorm's mean/variance and RMSNorm's mean of
  squares are permutation invariant, so ``LN(x Pi) = LN(x) Pi`` once gamma and beta are permuted),
  and the position / token-type embedding columns.
* ``ffn`` (per layer) -- the FFN's intermediate units: W1 (and Llama's gate and up) output,
  W2 input. Element-wise activations commute with permutations.
* heads (per layer) -- the order of attention heads. With grouped-query attention the key/value
  heads are permuted and each group's query heads are permuted among themselves, so every query
  head keeps its own key/value head.
* within-head dimensions (per layer) -- Q and K share one permutation (``q.k`` is invariant under
  a common permutation of both), V and the input of the output projection share another. For
  RoPE models Q/K stay in place within a head: rotary dimension ``i`` is paired with ``i + d/2``
  and rotated at frequency ``theta_i``, so a permutation that keeps pairs together and leaves
  every frequency where the server's rotary code expects it is the identity. Heads still move
  as a whole, and V dimensions are permuted freely.
* ``vocab`` (server-held embeddings only) -- the rows of the token embedding and LM head, so the
  server sees permuted token ids and returns permuted logits.

A tensor of the state dict that no rule covers raises UnsupportedModelError: leaving a weight
unpermuted would silently break the model, so we fail instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ...errors import UnsupportedModelError
from ...families import FamilySpec

@dataclass(frozen=True)
class AttentionShape:
    """Query heads, key/value heads (grouped-query attention) and the head width of a config."""

    n_heads: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> "AttentionShape":
        """From a transformers config; UnsupportedModelError when the query heads do not group evenly."""
        hidden = config.hidden_size
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or hidden // n_heads
        if n_heads % n_kv:
            raise UnsupportedModelError(f"{n_heads} query heads cannot be grouped over {n_kv} key/value heads")
        return cls(n_heads, n_kv, head_dim)


def _expand(head_order: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Index vector over ``heads * head_dim`` columns: new head h, dim i <- old head_order[h], inner[i]."""
    head_dim = inner.numel()
    return (head_order[:, None] * head_dim + inner[None, :]).reshape(-1)


def sample_layer_permutations(
    shape: AttentionShape, ffn_size: int, rope: bool, internal: bool, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Per-layer permutations that cost nothing at run time (identities when ``internal`` is off)."""

    def perm(n: int) -> torch.Tensor:
        return torch.randperm(n, generator=gen) if internal else torch.arange(n)

    group = shape.n_heads // shape.n_kv_heads
    kv_heads = perm(shape.n_kv_heads)
    q_heads = torch.cat([kv * group + perm(group) for kv in kv_heads.tolist()])
    qk_inner = torch.arange(shape.head_dim) if rope else perm(shape.head_dim)
    vo_inner = perm(shape.head_dim)
    q = _expand(q_heads, qk_inner)
    k = _expand(kv_heads, qk_inner)
    v = _expand(kv_heads, vo_inner)
    width = shape.n_heads * shape.head_dim
    return {
        "q": q,
        "k": k,
        "v": v,
        "o_in": _expand(q_heads, vo_inner),
        # GPT-2 fuses Q, K and V into one Conv1D whose output is [q | k | v].
        "qkv": torch.cat([q, k + width, v + 2 * width]) if shape.n_heads == shape.n_kv_heads else None,
        "ffn": perm(ffn_size),
    }


def ffn_size_of(config) -> int:
    """The FFN's intermediate width (GPT-2's ``n_inner``, default ``4 * hidden``)."""
    size = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    return size or 4 * config.hidden_size


def rewrite_state_dict(
    state: dict[str, torch.Tensor],
    family: FamilySpec,
    global_perms: dict[str, torch.Tensor],
    layer_perms: list[dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Apply the family's rules to every floating-point tensor of ``state``.

    ``global_perms`` holds "hidden" and, for server-held embeddings, "vocab" (absent: rows stay).
    Integer buffers (e.g. BERT's position_ids) are copied unchanged.
    """
    compiled = [(re.compile(r"(^|\.)" + rx.replace("{n}", r"(?P<n>\d+)") + "$"), axes) for rx, axes in family.rules]
    out = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        for pattern, axes in compiled:
            match = pattern.search(name)
            if match is None:
                continue
            layer = match.groupdict().get("n")
            perms = global_perms if layer is None else {**global_perms, **layer_perms[int(layer)]}
            for axis, perm_name in axes.items():
                perm = perms.get(perm_name)
                if perm is None and perm_name != "vocab":
                    raise UnsupportedModelError(f"{name}: no '{perm_name}' permutation for this model")
                if perm is not None:
                    if tensor.shape[axis] != perm.numel():
                        raise UnsupportedModelError(
                            f"{name}: axis {axis} has size {tensor.shape[axis]}, expected {perm.numel()} ({perm_name})"
                        )
                    tensor = tensor.index_select(axis, perm)
            out[name] = tensor.contiguous()
            break
        else:
            raise UnsupportedModelError(f"the permute converter has no rule for weight {name!r} ({family.name})")
    return out
