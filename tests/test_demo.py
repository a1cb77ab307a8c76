"""The demo end to end on the embedded model: convert, serve over HTTP, generate, compare."""

from __future__ import annotations

from transformers import AutoModelForCausalLM

from hf_secure.demo import DEMO_MODEL, run_demo


def test_embedded_demo_model_is_a_small_gpt2():
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL)
    assert model.config.model_type == "gpt2"
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert (DEMO_MODEL / "README.md").read_text().count("Austen") > 0


def test_demo_generates_the_plaintext_tokens(capsys):
    figures = run_demo(max_new_tokens=12)
    assert figures["tokens_identical_to_plaintext"]
    assert figures["max_abs_logit_error"] < 1e-4
    assert figures["rounds"] == 12
    out = capsys.readouterr().out
    assert "It is a truth universally acknowledged" in out
