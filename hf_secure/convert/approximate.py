"""``hf-secure convert approximate``: an MPC-friendly checkpoint for the mpc protocol.

The output is a transformers checkpoint of model type ``hf_secure_approx_<family>``
(weights under the family's keys, unchanged) whose ``config.json`` records the approximations in
its ``hf_secure`` section (:mod:`hf_secure.protocols.mpc.approximations`): the activation and
softmax replacements, and the public deflation bound of every LayerNorm's variance (RMSNorm's mean
square), calibrated in plaintext on the owner's text (a coarse statistic of the model's
activations, public to the servers).

Defaults: with ``distill_text``, MPCFormer's cheap replacements (Quad GeLU, 2Quad softmax) that
distillation makes accurate; without, SecFormer's accurate ones (segmented erf GeLU, exact-style
softmax). Llama-like families (Llama, Mistral, Qwen2) always use the segmented sine-series SiLU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from .. import __version__
from ..errors import UnknownOptionError, UnsupportedModelError
from ..hub import load_source_config
from ..families import FamilySpec, family_of
from ..modeling.approximate import approximated
from ..protocols.mpc.client import activation_bound, calibrate
from .distill import distill

GELU_CHOICES = ("quad", "secformer")
SOFTMAX_CHOICES = ("2quad", "exact")
FIRST_TOKEN_SAMPLE = 4096  # vocabularies larger than this are sampled for the one-token calibration


def calibrate_first_tokens(model, family: str, chunk: int = 1024) -> dict[str, float]:
    """Normalisation bounds from every vocabulary token as a one-token prompt (a sample of
    :data:`FIRST_TOKEN_SAMPLE` for larger vocabularies, always the same one).

    A prompt's first position is where a single token's embedding meets the first normalisation
    alone (GPT-2's first-position activations are the largest of a sequence); text alone leaves
    tokens out, whose queries the protocol would then refuse (out of range) though they are
    ordinary. Chunks of ``chunk`` prompts keep memory small.
    """
    vocab = model.config.vocab_size
    ids = torch.arange(vocab)
    if vocab > FIRST_TOKEN_SAMPLE:
        ids = ids[torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:FIRST_TOKEN_SAMPLE]]
    bounds: dict[str, float] = {}
    for start in range(0, ids.numel(), chunk):
        part = calibrate(model, family, input_ids=ids[start : start + chunk, None])
        bounds = {site: max(bounds.get(site, 0.0), bound) for site, bound in part.items()}
    return bounds


DEFAULT_CALIBRATION = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "The weather today is mild, with a light wind from the west and rain in the evening.",
    "Please remember to lock the door when you leave the office on Friday.",
    "Numbers such as 3.14, 42 and 2026 appear in many documents and tables.",
]


def _activation(spec: FamilySpec, gelu: str | None, distilled: bool) -> str:
    """The approximated activation: SiLU families have one; GeLU families take ``gelu``
    ("quad" for distilled models by default, else "secformer")."""
    if spec.activations == ("series_silu",):
        if gelu is not None:
            raise UnknownOptionError(f"{spec.name} uses SiLU (approximated by a segmented sine series): gelu does not apply")
        return "series_silu"
    gelu = gelu or ("quad" if distilled else "secformer")
    if gelu not in GELU_CHOICES:
        raise UnknownOptionError(f"gelu must be one of {GELU_CHOICES}, got {gelu!r}")
    return f"{gelu}_gelu"


def convert_approximate(src, out, *, gelu: str | None = None, softmax: str | None = None,
                        calibration_text: list[str] | None = None, distill_text: list[str] | None = None,
                        distill_epochs: tuple[int, int] = (2, 1), revision: str | None = None) -> dict:
    """Write the approximated checkpoint of ``src`` (a family of :mod:`hf_secure.families`) to ``out``; return its section.

    With ``distill_text`` the approximated model is first distilled from the original
    (:mod:`hf_secure.convert.distill`, MPCFormer's two stages); the losses are recorded.
    """
    config = load_source_config(src, revision=revision)
    spec = family_of(config)
    spec.refuse(config)
    activation = _activation(spec, gelu, bool(distill_text))
    softmax = softmax or ("2quad" if distill_text else "exact")
    if softmax not in SOFTMAX_CHOICES:
        raise UnknownOptionError(f"softmax must be one of {SOFTMAX_CHOICES}, got {softmax!r}")
    config_class, model_class = approximated(spec)
    loader = AutoModelForCausalLM if spec.causal else AutoModel
    # eager attention: the teacher's attention probabilities are distillation targets
    source = loader.from_pretrained(src, revision=revision, dtype=torch.float32, attn_implementation="eager").eval()
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "hf_secure")}
    fields.update({spec.activation_field: "hf_secure_" + activation}, softmax_approximation=softmax)
    model = model_class(config_class(**fields)).eval()
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.startswith("pooler.")]:
        raise UnsupportedModelError(f"weights do not map onto {spec.name}: missing {missing}, unexpected {unexpected}")

    tokenizer = AutoTokenizer.from_pretrained(src, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    history = None
    if distill_text:
        if softmax == "exact":
            model.config._attn_implementation = "eager"
        history = distill(source, model, tokenizer, distill_text, epochs=distill_epochs)
    batch = tokenizer(calibration_text or DEFAULT_CALIBRATION, return_tensors="pt", padding=True)
    bounds = calibrate(model, spec.name, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for site, bound in calibrate_first_tokens(model, spec.name).items():
        bounds[site] = max(bounds[site], bound)
    segment_bound = None if activation == "quad_gelu" else activation_bound(model, spec.name, activation)
    section = {
        "protocol": "mpc",
        "version": 1,
        "hf_secure_version": __version__,
        "family": spec.name,
        "approximations": {"activation": activation, "softmax": softmax, "ln_bounds": bounds,
                           "activation_input_bound": segment_bound},
    }
    if history is not None:
        section["distillation"] = {"texts": len(distill_text), "epochs": list(distill_epochs), "loss": history}
    model.config.hf_secure = section
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if getattr(source, "generation_config", None) is not None and spec.causal:
        source.generation_config.save_pretrained(out)
    return section
