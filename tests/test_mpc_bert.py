"""A BERT encoder through the mpc protocol against plaintext transformers."""

from __future__ import annotations

import torch

import json
import subprocess
import sys

import pytest
from transformers import AutoModel, AutoTokenizer

from hf_secure.convert import convert_approximate
from hf_secure.errors import UnknownOptionError, UnsupportedModelError
from hf_secure.protocols.mpc.approximations import Approximations
from hf_secure.protocols.mpc.bert import BertProgram
from hf_secure.protocols.mpc.client import calibrate
from hf_secure.protocols.mpc.run import run_program

from .conftest import make_tiny, minilm_folder


def _inputs(model, ids, mask):
    onehot = torch.nn.functional.one_hot(ids, model.config.vocab_size)
    public = {
        "position_ids": torch.arange(ids.shape[1])[None].expand_as(ids),
        "token_type_ids": torch.zeros_like(ids),
        "attention_mask": mask,
    }
    weights = {k: v for k, v in model.state_dict().items()
               if v.is_floating_point() and not k.startswith("pooler.")}
    return onehot, public, weights


def test_tiny_bert_matches_plaintext(tmp_path):
    """Exact-style path (SecFormer GeLU, comparison-based softmax, Goldschmidt LayerNorm)."""
    model = make_tiny("bert", tmp_path / "bert")
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding at the end
    bounds = calibrate(model, "bert", input_ids=ids, attention_mask=mask)
    approx = Approximations(activation="secformer_gelu", softmax="exact", ln_bounds=bounds)
    onehot, public, weights = _inputs(model, ids, mask)
    (hidden,), report = run_program(BertProgram.from_config(model.config, approx), [onehot], weights, public)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).last_hidden_state
    valid = mask[0].bool()
    err = (hidden[0, valid] - expected[0, valid]).abs().max().item()
    assert err < 0.05, err
    assert report["DEALER"]["offline_bytes"] > 0


def _tiny_bert_with_tokenizer(folder):
    """A tiny random BERT with a real tokenizer (the converter calibrates on text)."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    make_tiny("bert", folder, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(folder)


@pytest.mark.parametrize("gelu, softmax", [("quad", "2quad"), ("secformer", "exact")])
def test_approximated_checkpoint_plaintext_vs_mpc(tmp_path, gelu, softmax):
    """The converted MPC-friendly model in plaintext is the reference for the protocol on the same weights."""
    _tiny_bert_with_tokenizer(tmp_path / "bert")
    section = convert_approximate(tmp_path / "bert", tmp_path / "approx", gelu=gelu, softmax=softmax)
    assert set(section["approximations"]["ln_bounds"]) == {"embeddings"} | {f"{i}.ln{j}" for i in (0, 1) for j in (1, 2)}
    model = AutoModel.from_pretrained(tmp_path / "approx").eval()
    assert type(model).__name__ == "ApproxBertModel"
    ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    onehot, public, weights = _inputs(model, ids, mask)
    program = BertProgram.from_config(model.config, Approximations.from_config(model.config))
    (hidden,), _ = run_program(program, [onehot], weights, public)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).last_hidden_state
    valid = mask[0].bool()
    assert (hidden[0, valid] - expected[0, valid]).abs().max().item() < 0.05


def test_approximated_checkpoint_fails_closed_without_hf_secure(tmp_path):
    _tiny_bert_with_tokenizer(tmp_path / "bert")
    convert_approximate(tmp_path / "bert", tmp_path / "approx")
    assert json.loads((tmp_path / "approx" / "config.json").read_text())["hf_secure"]["protocol"] == "mpc"
    code = f"from transformers import AutoModel; AutoModel.from_pretrained({str(tmp_path / 'approx')!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "hf_secure_approx_bert" in out.stderr


def test_approximate_rejects_unknown_options_and_models(tmp_path):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    make_tiny("gpt2", tmp_path / "gpt2")
    with pytest.raises(UnknownOptionError, match="gelu"):
        convert_approximate(tmp_path / "gpt2", tmp_path / "x", gelu="cubic")
    with pytest.raises(UnknownOptionError, match="softmax"):
        convert_approximate(tmp_path / "gpt2", tmp_path / "x", softmax="relu")
    make_tiny("llama", tmp_path / "llama")
    with pytest.raises(UnknownOptionError, match="SiLU"):
        convert_approximate(tmp_path / "llama", tmp_path / "x", gelu="quad")
    GPTNeoForCausalLM(GPTNeoConfig(num_layers=1, hidden_size=32, num_heads=2, vocab_size=50,
                                   attention_types=[[["global"], 1]])).save_pretrained(tmp_path / "neo")
    with pytest.raises(UnsupportedModelError, match="gpt_neo"):
        convert_approximate(tmp_path / "neo", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_distillation_brings_the_approximated_model_closer(tmp_path):
    """MPCFormer's two stages reduce the student's distance to the original on held-out text."""
    _tiny_bert_with_tokenizer(tmp_path / "bert")
    texts = [f"sample sentence number {i} about {w} and the weather" for i, w in
             enumerate(["cats", "trains", "music", "rivers", "bread", "stars", "maps", "tea"] * 4)]
    held_out = ["an unseen sentence about mountains and lakes", "numbers 3 5 8 in a row"]
    plain = convert_approximate(tmp_path / "bert", tmp_path / "plain", gelu="quad", softmax="2quad")
    tuned = convert_approximate(tmp_path / "bert", tmp_path / "tuned", gelu="quad", softmax="2quad",
                                distill_text=texts, distill_epochs=(3, 1))
    assert "distillation" in tuned and "distillation" not in plain
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "bert")
    batch = tokenizer(held_out, return_tensors="pt", padding=True)
    with torch.no_grad():
        target = AutoModel.from_pretrained(tmp_path / "bert")(**batch).last_hidden_state

        def distance(folder):
            return (AutoModel.from_pretrained(folder)(**batch).last_hidden_state - target).pow(2).mean().item()

        assert distance(tmp_path / "tuned") < 0.8 * distance(tmp_path / "plain")


def test_session_serves_several_queries_and_fails_cleanly_when_a_server_dies(tmp_path):
    import os
    import signal
    import time

    from hf_secure.errors import PartyFailedError
    from hf_secure.protocols.mpc.run import MPCSession
    from hf_secure.runtime import Role

    model = make_tiny("bert", tmp_path / "bert")
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    onehot, public, weights = _inputs(model, ids, mask)
    approx = Approximations(ln_bounds=calibrate(model, "bert", input_ids=ids, attention_mask=mask))
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).last_hidden_state
    session = MPCSession(BertProgram.from_config(model.config, approx), weights, timeout_s=30)
    try:
        for _ in range(2):  # weights are shared once; each query has its own offline phase
            (hidden,), report = session.run([onehot], public)
            assert (hidden - expected).abs().max().item() < 0.05
            assert report["DEALER"]["offline_bytes"] > 0
        os.kill(session._group.procs[Role.SERVER1].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(PartyFailedError):
            session.run([onehot], public)
        assert time.monotonic() - start < 40
    finally:
        session.close()


def test_secure_feature_extraction_pipeline_with_mpc(tmp_path):
    """pipeline(..., protocol="mpc") on a converted checkpoint matches the plaintext approximated model."""
    from transformers import pipeline

    import hf_secure  # noqa: F401
    from hf_secure.modeling import SecureModel

    _tiny_bert_with_tokenizer(tmp_path / "bert")
    convert_approximate(tmp_path / "bert", tmp_path / "approx", gelu="quad", softmax="2quad")
    secure = pipeline("secure-feature-extraction", model=str(tmp_path / "approx"), protocol="mpc")
    plain = pipeline("feature-extraction", model=str(tmp_path / "approx"))
    try:
        for text in ["private inference", "a second, longer sentence for the same session"]:
            got, expected = torch.tensor(secure(text)), torch.tensor(plain(text))
            assert got.shape == expected.shape
            assert (got - expected).abs().max().item() < 0.05
        stats = secure.secure_stats
        assert stats["rounds"] > 0 and stats["bytes_sent"] > 0
    finally:
        secure.model.engine.close()
    with pytest.raises(UnknownOptionError, match="key: not an option of the mpc protocol"):
        SecureModel.from_pretrained(tmp_path / "approx", protocol="mpc", key=tmp_path / "none.safetensors")
    with pytest.raises(UnknownOptionError, match="protocol"):
        SecureModel.from_pretrained(tmp_path / "approx", protocol="permute")
