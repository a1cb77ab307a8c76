"""Which approximation each nonlinearity uses, and the public constants they need.

Recorded by ``hf-secure convert approximate`` in ``config.hf_secure["approximations"]``:

* ``activation``: ``"secformer_gelu"`` (segmented sine-series erf), ``"quad_gelu"`` (MPCFormer's
  Quad, for distilled models) or ``"series_silu"`` (segmented sine-series tanh, Llama). The
  plaintext model registers the same function in ``ACT2FN`` as ``"hf_secure_" + activation``.
* ``softmax``: ``"exact"`` (max by comparisons, ``(1 + t/256)^256``, Goldschmidt division) or
  ``"2quad"`` (MPCFormer's ``(s + 5)^2`` normalised, for distilled models).
* ``activation_input_bound``: the largest ``|u|`` the GeLU/SiLU segments can see (``u = x / sqrt 2``
  for GeLU, ``x`` for SiLU: :data:`.nonlinear.U_SCALE`), proven from the weights
  (:func:`activation_input_bound`); when the input ``x`` it bounds is within the segment tests'
  lanes the per-query range check of those inputs is skipped (absent, e.g. in older checkpoints:
  checked per query).
* ``ln_bounds``: per normalisation site, the public bound by which LayerNorm's variance (RMSNorm's
  mean square) is deflated before Goldschmidt's inverse square root; calibrated in plaintext on the
  owner's text (:func:`calibrate_norms`). It is a coarse statistic of the model's activations and
  is public to the servers.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from ...errors import UnknownOptionError
from .core import MPC, Shared
from .nonlinear import SEGMENT_LIMIT, U_SCALE, gelu, quad_gelu, silu, softmax, two_quad_softmax

ACTIVATIONS = {"secformer_gelu": gelu, "quad_gelu": quad_gelu, "series_silu": silu}
SOFTMAXES = ("exact", "2quad")


@dataclass(frozen=True)
class Approximations:
    """Which approximation each nonlinearity of a program uses, and its public constants (see the
    module docstring). Raises UnknownOptionError for an activation or softmax it does not know."""

    activation: str = "secformer_gelu"
    softmax: str = "exact"
    ln_bounds: dict = field(default_factory=dict)  # normalisation site -> deflation bound
    activation_input_bound: float | None = None  # proven max |u| of the segment tests (None: unknown)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise UnknownOptionError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.softmax not in SOFTMAXES:
            raise UnknownOptionError(f"softmax must be one of {SOFTMAXES}, got {self.softmax!r}")

    def bound(self, site: str) -> float:
        """The public deflation bound of a normalisation site's statistic (1.0 if not calibrated)."""
        return self.ln_bounds.get(site, 1.0)

    def act(self, x: Shared) -> Shared:
        """The activation; its segment tests' inputs are range-checked unless the weights prove them in range."""
        if self.activation == "quad_gelu":
            return quad_gelu(x)
        bound = self.activation_input_bound
        proven = bound is not None and bound / U_SCALE[self.activation] <= SEGMENT_LIMIT
        return ACTIVATIONS[self.activation](x, check_range=not proven)

    def attention_probs(self, scores: Shared, keep: torch.Tensor) -> Shared:
        """Softmax over the last dim of ``scores``; ``keep``: public 0/1 mask broadcastable to them."""
        if self.softmax == "exact":
            return softmax(scores, keep)
        return two_quad_softmax(scores, keep)

    @classmethod
    def from_config(cls, config) -> "Approximations":
        """What ``hf-secure convert approximate`` recorded in ``config.hf_secure``."""
        recorded = config.hf_secure["approximations"]
        return cls(activation=recorded["activation"], softmax=recorded["softmax"], ln_bounds=recorded["ln_bounds"],
                   activation_input_bound=recorded.get("activation_input_bound"))


@contextlib.contextmanager
def scope(mpc: MPC, name: str):
    """Attribute a block's traffic and time to ``name`` in the per-scope report, and name it in range
    checks (:mod:`.ranges`).

    The report part is a no-op without a channel and in offline replays (the dealer's, a server's
    preparation): their time belongs to the ``offline`` scope.
    """
    outer, mpc.where = mpc.where, name
    try:
        if mpc.channel is None or mpc.offline:
            yield
        else:
            with mpc.channel.scope(name):
                yield
    finally:
        mpc.where = outer


@torch.no_grad()
def calibrate_norms(model, sites: dict[str, str], margin: float = 1.5, **inputs) -> dict[str, float]:
    """Plaintext pass recording each normalisation's largest input statistic; bound = margin * max / 2.

    ``sites`` maps module names (or their last components, e.g. ``"h.0.ln_1"``) to site names. The
    statistic is the variance plus eps for ``nn.LayerNorm``, the mean square plus eps otherwise
    (RMSNorm). Deflating by the bound puts the largest value at ``1 / margin`` of Goldschmidt's fast
    range; smaller ones (down to 1e-4 of the bound) need more Goldschmidt steps (:func:`.nonlinear.inv_sqrt`).
    """
    seen: dict[str, float] = {}
    hooks = []
    for name, module in model.named_modules():
        site = next((s for suffix, s in sites.items() if _named(name, suffix)), None)
        if site is None:
            continue

        def record(mod, args, out, site=site):
            x = args[0].double()
            if isinstance(mod, torch.nn.LayerNorm):
                stat = x.var(-1, unbiased=False) + mod.eps
            else:
                stat = x.pow(2).mean(-1) + getattr(mod, "variance_epsilon", getattr(mod, "eps", 0.0))
            seen[site] = max(seen.get(site, 0.0), stat.max().item())

        hooks.append(module.register_forward_hook(record))
    if len(hooks) != len(sites):
        raise UnknownOptionError(f"found {len(hooks)} of the {len(sites)} normalisation modules to calibrate")
    try:
        model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return {site: margin * value / 2 for site, value in seen.items()}


@torch.no_grad()
def activation_input_bound(model, sites: list[tuple[str, str]], activation: str, margin: float = 1.05) -> float:
    """An upper bound on ``|u|`` at the activation's segment tests, for every input, from the weights.

    ``sites``: per layer, the normalisation and the projection whose output ``x`` feeds the
    activation (``u = x / sqrt 2`` for GeLU, ``u = x`` for SiLU). A LayerNorm's output is
    ``gamma * z + beta`` with ``||z|| = sqrt(n)`` exactly (an RMSNorm's: at most), so output unit
    ``j`` of a projection ``W`` (in, out) with bias ``b`` obeys, by Cauchy-Schwarz,
    ``|x_j| <= sqrt(n) ||gamma * W[:, j]|| + |beta . W[:, j] + b_j|``; ``margin`` covers the
    inverse square root's error within its range (which is checked per query). Public: one number
    per model, as coarse as the LayerNorm bounds.
    """
    modules = dict(model.named_modules())
    bound = 0.0
    for norm_name, proj_name in sites:
        norm, proj = _find(modules, norm_name), _find(modules, proj_name)
        gamma = norm.weight.double()
        beta = norm.bias.double() if getattr(norm, "bias", None) is not None else torch.zeros_like(gamma)
        weight = proj.weight.double()
        w = weight if type(proj).__name__ == "Conv1D" else weight.T  # (in, out)
        b = proj.bias.double() if getattr(proj, "bias", None) is not None else torch.zeros(w.shape[1])
        per_unit = math.sqrt(w.shape[0]) * (gamma[:, None] * w).norm(dim=0) + (beta @ w + b).abs()
        bound = max(bound, per_unit.max().item())
    return margin * U_SCALE[activation] * bound


def _named(module_name: str, name: str) -> bool:
    """Whether ``module_name`` is ``name``, or ends in ``.name`` (a model with a prefix, e.g. a head)."""
    return module_name == name or module_name.endswith("." + name)


def _find(modules: dict, name: str):
    """The module called ``name``, or the one module whose name ends in ``.name`` (as :func:`calibrate_norms` matches)."""
    found = [m for n, m in modules.items() if _named(n, name)]
    if len(found) != 1:
        raise UnknownOptionError(f"{len(found)} modules named {name!r}: cannot bound the activation's input")
    return found[0]
