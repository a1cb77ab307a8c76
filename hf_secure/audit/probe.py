"""Where the audit looks inside a transformers model: named sites read with forward hooks.

A :class:`Site` is one place a server computes a value per position:

``residual``
    the residual stream entering block ``layer`` (``layer`` = number of blocks: the final hidden
    state, after the final norm where the family has one);
``attention_input``
    the input of block ``layer``'s Q projection (after the pre-attention norm; BERT has none, its
    attention reads the residual stream);
``q``, ``k``, ``v``
    the projections' outputs, heads side by side (before RoPE);
``ffn``
    the FFN's activations: the input of its output projection (after the nonlinearity).

:class:`Probe` reads sites from a model as it runs, without changing what it computes, so the same
probe serves the server's model (its real forward, its real inputs) and the attacker's copy of the
public model (where :meth:`Probe.run` stops the forward once every wanted site is read).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnknownOptionError, UnsupportedModelError

KINDS = ("residual", "attention_input", "q", "k", "v", "ffn")

# Module paths under ``model.base_model``, per family; "{i}" is the block index.
_LAYOUTS = {
    "gpt2": {"block": "h.{i}", "qkv": "h.{i}.attn.c_attn", "ffn": "h.{i}.mlp.c_proj"},
    "bert": {"block": "encoder.layer.{i}", "q": "encoder.layer.{i}.attention.self.query",
             "k": "encoder.layer.{i}.attention.self.key", "v": "encoder.layer.{i}.attention.self.value",
             "ffn": "encoder.layer.{i}.output.dense"},
    "llama": {"block": "layers.{i}", "q": "layers.{i}.self_attn.q_proj", "k": "layers.{i}.self_attn.k_proj",
              "v": "layers.{i}.self_attn.v_proj", "ffn": "layers.{i}.mlp.down_proj"},
}
_LAYOUTS["mistral"] = _LAYOUTS["qwen2"] = _LAYOUTS["llama"]


@dataclass(frozen=True, order=True)
class Site:
    """A value per position inside the model: ``kind`` (one of :data:`KINDS`) at block ``layer``."""

    kind: str
    layer: int

    @property
    def label(self) -> str:
        return f"{self.kind.replace('_', ' ')} {self.layer}"


def sites_of(family: str, num_layers: int, residual_layers: list[int], kinds=KINDS) -> list[Site]:
    """The sites an audit reads for ``residual_layers`` (each in 0..num_layers): the residual stream at
    each, and the block sites of blocks ``min(layer, num_layers - 1)``, of the given ``kinds``
    (BERT has no separate attention input). UnknownOptionError for a kind not in :data:`KINDS`."""
    if family not in _LAYOUTS:
        raise UnsupportedModelError(f"the audit has no site layout for family {family!r}")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise UnknownOptionError(f"views {unknown or '(none)'}: choose from {KINDS}")
    sites = []
    for layer in residual_layers:
        if not 0 <= layer <= num_layers:
            raise UnsupportedModelError(f"layer {layer} outside 0..{num_layers}")
        block = min(layer, num_layers - 1)
        for kind in kinds:
            if kind == "residual":
                sites.append(Site("residual", layer))
            elif not (family == "bert" and kind == "attention_input"):
                sites.append(Site(kind, block))
    return sorted(set(sites))


class _Captured(Exception):
    """Raised by a hook once every wanted site is read: the rest of the forward is not needed."""


class Probe:
    """Forward hooks on ``model`` that read ``sites`` as ``[batch, seq, width]`` float32 tensors.

    Args:
        model: a transformers model of ``family`` (task heads allowed: sites are under ``base_model``).
        family: a family name of :mod:`hf_secure.families`.
        sites: what to read.

    Use as a context manager around the model's own forward (``captured`` holds the values), or
    call :meth:`run` for a forward of its own that stops after the last site.
    """

    def __init__(self, model, family: str, sites: list[Site]):
        if family not in _LAYOUTS:
            raise UnsupportedModelError(f"the audit has no site layout for family {family!r}")
        self.model = model
        self.base = model.base_model
        self.layout = _LAYOUTS[family]
        self.num_layers = model.config.num_hidden_layers
        self.sites = list(sites)
        self.captured: dict[Site, torch.Tensor] = {}
        self._stop = False
        self._handles = []

    # -- hooks --------------------------------------------------------------------------------
    def _store(self, site: Site, value: torch.Tensor) -> None:
        self.captured[site] = value.detach().float()
        if self._stop and len(self.captured) == len(self.sites):
            raise _Captured

    def _module(self, role: str, layer: int):
        return self.base.get_submodule(self.layout[role].format(i=layer))

    def __enter__(self) -> "Probe":
        self.captured = {}
        for site in self.sites:
            self._handles.append(self._hook(site))
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return exc[0] is _Captured

    def _hook(self, site: Site):
        if site.kind == "residual" and site.layer == self.num_layers:
            def final(module, args, kwargs, output):
                hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
                self._store(site, hidden)
            return self.base.register_forward_hook(final, with_kwargs=True)
        if site.kind == "residual":
            def block_input(module, args, kwargs):
                self._store(site, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
            return self._module("block", site.layer).register_forward_pre_hook(block_input, with_kwargs=True)
        if site.kind in ("attention_input", "ffn"):
            role = "ffn" if site.kind == "ffn" else ("qkv" if "qkv" in self.layout else "q")

            def layer_input(module, args):
                self._store(site, args[0])
            return self._module(role, site.layer).register_forward_pre_hook(layer_input)
        if "qkv" in self.layout:  # GPT-2: one fused projection, output [q | k | v]
            part = ("q", "k", "v").index(site.kind)

            def fused(module, args, output):
                self._store(site, output.chunk(3, dim=-1)[part])
            return self._module("qkv", site.layer).register_forward_hook(fused)

        def projection(module, args, output):
            self._store(site, output)
        return self._module(site.kind, site.layer).register_forward_hook(projection)

    # -- a forward of its own ---------------------------------------------------------------------
    @torch.no_grad()
    def run(self, **inputs) -> dict[Site, torch.Tensor]:
        """Run the model on ``inputs`` until every site is read; the values by site."""
        self._stop = True
        try:
            with self:
                self.model(**inputs)
        finally:
            self._stop = False
        missing = [s.label for s in self.sites if s not in self.captured]
        if missing:
            raise UnsupportedModelError(f"the forward never reached {missing}")
        return dict(self.captured)
