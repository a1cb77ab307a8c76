"""``hf-secure convert approximate``: an MPC-friendly checkpoint for the mpc protocol.

The output is a transformers checkpoint of model type ``hf_secure_approx_bert`` (weights under
BERT's keys, unchanged) whose ``config.json`` records the approximations in its ``hf_secure``
section: GeLU and softmax replacements, and the public deflation bound of every LayerNorm's
variance, calibrated in plaintext on the owner's text (a coarse statistic of the model's
activations, public to the servers).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from .. import __version__
from ..errors import UnknownOptionError, UnsupportedModelError
from ..modeling.approximate import ApproxBertConfig, ApproxBertModel
from ..protocols.mpc.bert import calibrate_layer_norms
from .distill import distill

GELU_CHOICES = {"quad": "hf_secure_quad_gelu", "secformer": "hf_secure_secformer_gelu"}
SOFTMAX_CHOICES = ("2quad", "exact")
DEFAULT_CALIBRATION = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "The weather today is mild, with a light wind from the west and rain in the evening.",
    "Please remember to lock the door when you leave the office on Friday.",
    "Numbers such as 3.14, 42 and 2026 appear in many documents and tables.",
]


def convert_approximate(src, out, *, gelu: str = "quad", softmax: str = "2quad",
                        calibration_text: list[str] | None = None, distill_text: list[str] | None = None,
                        distill_epochs: tuple[int, int] = (2, 1), revision: str | None = None) -> dict:
    """Write the approximated checkpoint of ``src`` (a BERT model) to ``out``; return its section.

    With ``distill_text`` the approximated model is first distilled from the original
    (:mod:`hf_secure.convert.distill`, MPCFormer's two stages); the losses are recorded.
    """
    if gelu not in GELU_CHOICES:
        raise UnknownOptionError(f"gelu must be one of {sorted(GELU_CHOICES)}, got {gelu!r}")
    if softmax not in SOFTMAX_CHOICES:
        raise UnknownOptionError(f"softmax must be one of {SOFTMAX_CHOICES}, got {softmax!r}")
    config = AutoConfig.from_pretrained(src, revision=revision)
    if config.model_type not in ("bert", ApproxBertConfig.model_type):
        raise UnsupportedModelError(f"convert approximate supports BERT models for now, got {config.model_type!r}")
    # eager attention: the teacher's attention probabilities are distillation targets
    source = AutoModel.from_pretrained(src, revision=revision, dtype=torch.float32, attn_implementation="eager").eval()
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "hf_secure")}
    fields.update(hidden_act=GELU_CHOICES[gelu], softmax_approximation=softmax)
    model = ApproxBertModel(ApproxBertConfig(**fields)).eval()
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.startswith("pooler.")]:
        raise UnsupportedModelError(f"weights do not map onto BERT: missing {missing}, unexpected {unexpected}")

    tokenizer = AutoTokenizer.from_pretrained(src, revision=revision)
    history = None
    if distill_text:
        if softmax == "exact":
            model.config._attn_implementation = "eager"
        history = distill(source, model, tokenizer, distill_text, epochs=distill_epochs)
    batch = tokenizer(calibration_text or DEFAULT_CALIBRATION, return_tensors="pt", padding=True)
    bounds = calibrate_layer_norms(model, batch["input_ids"], batch["attention_mask"])
    section = {
        "protocol": "mpc",
        "version": 1,
        "hf_secure_version": __version__,
        "family": "bert",
        "approximations": {"gelu": gelu, "softmax": softmax, "ln_bounds": bounds},
    }
    if history is not None:
        section["distillation"] = {"texts": len(distill_text), "epochs": list(distill_epochs), "loss": history}
    model.config.hf_secure = section
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return section
