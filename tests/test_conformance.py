"""One battery for every (protocol, family) pair: what a new protocol or family inherits.

For each registered protocol (:data:`hf_secure.engines.PROTOCOLS`) and model family
(:data:`hf_secure.families.FAMILIES`), a tiny random model with non-trivial norms is converted the
protocol's way and must:

* agree with its plaintext reference on the same input (permute: the original model, to fp32
  rounding; mpc: the approximated plaintext model, to the approximations' fixed-point error;
  fss: the original model, to its tables' and fixed point's error);
* for causal families, generate greedily the same tokens as the reference (a protocol with a
  fixed-point error may take the other branch of a tie closer than its tolerance, nowhere else);
* refuse bad input with a clear error: an unknown option, token ids outside the vocabulary, and
  a missing or foreign key where the protocol has keys.

A protocol joins by a ``_convert`` branch below (how its checkpoints are made: the one place a test
must know the protocol); a family joins by its spec alone.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from hf_secure import SecureModel, SecureModelForCausalLM
from hf_secure.convert import convert_approximate, convert_permute
from hf_secure.demo import DEMO_MODEL
from hf_secure.engines import PROTOCOLS
from hf_secure.errors import InvalidInputError, MissingKeyError, UnknownOptionError
from hf_secure.families import FAMILIES

from .conftest import TOL, make_tiny

# mpc against the approximated plaintext model: fixed-point error only, on outputs of size ~1
TOLERANCE = {"permute": TOL, "mpc": 0.05, "fss": 0.05, "he": 0.01}
# pairs in the slow suite only: he's decoders take a query per generated token, a minute each for
# these two-layer models (tests/test_he_decoders.py runs GPT-2 and Llama in the default suite)
SLOW = {("he", name) for name in FAMILIES if FAMILIES[name].causal}
PAIRS = [pytest.param(protocol, name, id=f"{protocol}-{name}",
                      marks=[pytest.mark.slow] if (protocol, name) in SLOW else [])
         for protocol in PROTOCOLS for name in FAMILIES]


def _convert(protocol: str, src, out):
    """(converted folder, reference plaintext folder, from_pretrained options) for ``protocol``."""
    if protocol == "permute":
        convert_permute(src, out, out.parent / "client.key.safetensors", embeddings="client", seed=5)
        return out, src, {"key": str(out.parent / "client.key.safetensors")}
    if protocol == "mpc":
        convert_approximate(src, out)
        return out, out, {"protocol": "mpc"}
    if protocol in ("fss", "he"):  # Sigma and NEXUS run the checkpoint unmodified
        return src, src, {"protocol": protocol}
    raise AssertionError(f"no conversion for protocol {protocol!r}: add one to tests/test_conformance.py")


@pytest.mark.parametrize("protocol, name", PAIRS)
def test_protocol_and_family_agree_with_plaintext_and_refuse_bad_input(tmp_path, protocol, name):
    spec = FAMILIES[name]
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))  # the converter calibrates on text
    make_tiny(name, tmp_path / "plain", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(tmp_path / "plain")
    folder, reference, options = _convert(protocol, tmp_path / "plain", tmp_path / "converted")
    secure_class, plain_class = (SecureModelForCausalLM, AutoModelForCausalLM) if spec.causal else (SecureModel, AutoModel)
    plain = plain_class.from_pretrained(reference).eval()
    ids = torch.randint(3, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second row
    with pytest.raises(UnknownOptionError, match="colour"):
        secure_class.from_pretrained(folder, colour="blue", **options)
    model = secure_class.from_pretrained(folder, **options)
    try:
        with torch.no_grad():
            got, expected = model(ids, attention_mask=mask), plain(ids, attention_mask=mask)
        out = "logits" if spec.causal else "last_hidden_state"
        valid = mask.bool()
        assert (getattr(got, out) - getattr(expected, out))[valid].abs().max() < TOLERANCE[protocol]
        if spec.causal:
            prompt = ids[:1]
            got_tokens = model.generate(prompt, max_new_tokens=4, do_sample=False)
            want_tokens = plain.generate(prompt, max_new_tokens=4, do_sample=False)
            if not torch.equal(got_tokens, want_tokens):
                # allowed only where the plaintext choice is a tie closer than the protocol's error
                first = int((got_tokens[0] != want_tokens[0]).nonzero()[0])
                with torch.no_grad():
                    top = plain(want_tokens[:, :first]).logits[0, -1].topk(2).values
                assert top[0] - top[1] < 2 * TOLERANCE[protocol], (got_tokens, want_tokens)
        with pytest.raises(InvalidInputError, match="input_ids"):
            model(torch.tensor([[1, len(tokenizer)]]))
    finally:
        model.engine.close()
    if PROTOCOLS[protocol].creates_keys:  # its own key, made on first use: a path with none is refused
        with pytest.raises(MissingKeyError):
            secure_class.from_pretrained(folder, key=str(tmp_path / "absent.key"), **options)
    elif "key" in PROTOCOLS[protocol].options:
        with pytest.raises(MissingKeyError):
            secure_class.from_pretrained(folder, **{k: v for k, v in options.items() if k != "key"})
    else:  # a protocol without keys refuses one
        with pytest.raises(UnknownOptionError, match="key"):
            secure_class.from_pretrained(folder, key="client.key", **options)
