"""The permute protocol against the plaintext model, in process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer, pipeline

import hf_secure  # noqa: F401  (registers the secure pipelines)
from hf_secure.convert import convert_permute
from hf_secure.compat import CACHE_NAME
from hf_secure.errors import UnknownOptionError, UnsupportedModelError
from hf_secure.modeling import SecureModel, SecureModelForCausalLM

from .conftest import TOL, VOCAB, make_tiny, minilm_folder

MODES = ("client", "server")


@pytest.mark.parametrize("embeddings", MODES)
@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2"])
def test_causal_logits_match_plaintext(tiny, family, embeddings):
    plain, folder, key = tiny(family, embeddings)
    secure = SecureModelForCausalLM.from_pretrained(folder, key=key)
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    with torch.no_grad():
        expected = plain(ids, attention_mask=mask).logits
        out = secure(ids, attention_mask=mask)
    assert out.logits.shape == expected.shape
    assert (out.logits - expected).abs().max().item() < TOL
    assert getattr(out, CACHE_NAME).get_seq_length() == 17


@pytest.mark.parametrize("embeddings", MODES)
@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2"])
def test_greedy_generation_identical(tiny, family, embeddings):
    plain, folder, key = tiny(family, embeddings)
    secure = SecureModelForCausalLM.from_pretrained(folder, key=key)
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    expected = plain.generate(ids, **kwargs)
    got = secure.generate(ids, **kwargs)
    assert got.shape == (1, 9 + 32)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("embeddings", MODES)
@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "bert"])
def test_hidden_states_match_plaintext(tiny, family, embeddings):
    plain, folder, key = tiny(family, embeddings)
    secure = SecureModel.from_pretrained(folder, key=key)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = plain.base_model if family != "bert" else plain
        expected = base(ids)
        got = secure(ids)
    assert (got.last_hidden_state - expected.last_hidden_state).abs().max().item() < TOL
    if family == "bert":
        assert (got.pooler_output - expected.pooler_output).abs().max().item() < TOL


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "bert"])
def test_server_weights_are_permuted(tiny, family):
    """Norm weights and projections really moved (guards against a converter that is a no-op)."""
    plain, folder, _ = tiny(family, "server")
    converted = load_file(str(folder / "model.safetensors"))
    original = plain.state_dict()
    norm_names = [n for n in converted if ("norm" in n.lower() or ".ln_" in n) and n.endswith("weight")]
    assert norm_names
    for name in norm_names:
        assert not torch.equal(converted[name], original[name]), name
        assert torch.equal(converted[name].sort().values, original[name].sort().values), name


def test_client_mode_server_never_gets_vocabulary(tiny):
    _, folder, _ = tiny("gpt2", "client")
    weights = load_file(str(folder / "model.safetensors"))
    assert weights["wte.weight"].shape == (1, 64)
    assert not weights["wte.weight"].any()
    assert "lm_head.weight" not in weights


def test_internal_permutations_can_be_disabled(tmp_path):
    plain = make_tiny("gpt2", tmp_path / "plain")
    convert_permute(tmp_path / "plain", tmp_path / "a", tmp_path / "a.key", embeddings="server", seed=5,
                    permute_internal=False)
    convert_permute(tmp_path / "plain", tmp_path / "b", tmp_path / "b.key", embeddings="server", seed=5)
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    # Same hidden permutation, so only the internal permutations tell them apart.
    assert torch.equal(a["transformer.ln_f.weight"], b["transformer.ln_f.weight"])
    assert not torch.equal(a["transformer.h.0.mlp.c_fc.weight"], b["transformer.h.0.mlp.c_fc.weight"])
    for folder, key in ((tmp_path / "a", tmp_path / "a.key"), (tmp_path / "b", tmp_path / "b.key")):
        ids = torch.arange(3, 20)[None]
        with torch.no_grad():
            err = (SecureModelForCausalLM.from_pretrained(folder, key=key)(ids).logits - plain(ids).logits).abs().max()
        assert err.item() < TOL


def test_plain_transformers_loads_converted_folder_without_hf_secure(tiny):
    _, folder, _ = tiny("llama", "server")
    code = (
        "import sys, json, torch; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}); "
        "assert not any(k.startswith('hf_secure') for k in sys.modules), 'hf_secure was imported'; "
        "print(json.dumps({'cls': type(m).__name__, 'hf': m.config.hf_secure['protocol']}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"cls": "LlamaForCausalLM", "hf": "permute"}


def test_config_section_records_protocol_and_fingerprint(tiny):
    _, folder, key = tiny("gpt2", "server")
    section = json.loads((folder / "config.json").read_text())["hf_secure"]
    assert section["protocol"] == "permute" and section["version"] == 1
    assert section["key_fingerprint"].startswith("sha256:")
    assert set(section["weights"]) == {"model.safetensors"}
    assert not key.is_relative_to(folder)
    assert (folder / "README.md").is_file()


def test_key_inside_model_folder_is_refused(tmp_path):
    make_tiny("gpt2", tmp_path / "plain")
    with pytest.raises(UnknownOptionError, match="outside"):
        convert_permute(tmp_path / "plain", tmp_path / "out", tmp_path / "out" / "k.safetensors")


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=50)).save_pretrained(tmp_path / "neox")
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        convert_permute(tmp_path / "neox", tmp_path / "out", tmp_path / "k.safetensors")


def test_unknown_embedding_mode(tmp_path):
    make_tiny("gpt2", tmp_path / "plain")
    with pytest.raises(UnknownOptionError, match="embeddings"):
        convert_permute(tmp_path / "plain", tmp_path / "out", tmp_path / "k.safetensors", embeddings="both")


@pytest.mark.parametrize("embeddings", MODES)
def test_minilm_sentence_embeddings_match(tmp_path, embeddings):
    """The real all-MiniLM-L6-v2 (BERT) through the secure feature-extraction pipeline."""
    src = minilm_folder()
    convert_permute(src, tmp_path / "m", tmp_path / "k.safetensors", embeddings=embeddings)
    secure = pipeline("secure-feature-extraction", model=str(tmp_path / "m"), key=str(tmp_path / "k.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(src)
    plain = AutoModel.from_pretrained(src).eval()
    sentences = ["Private inference keeps the prompt away from the server.",
                 "A permutation is not encryption.", "Short one."]
    for sentence in sentences:
        got = torch.tensor(secure(sentence))[0]
        with torch.no_grad():
            expected = plain(**tokenizer(sentence, return_tensors="pt")).last_hidden_state[0]
        assert (got - expected).abs().max().item() < TOL
