"""Slow checks at realistic sizes: ``bash scripts/test.sh -m slow``."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hf_secure.convert import convert_permute
from hf_secure.modeling import SecureModelForCausalLM
from hf_secure.server.process import served

from .conftest import TOL, randomize_norms

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("embeddings", ["client", "server"])
@pytest.mark.parametrize(
    "model_class, config",
    [
        (GPT2LMHeadModel, GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)),
        (LlamaForCausalLM, LlamaConfig(num_hidden_layers=4, hidden_size=512, num_attention_heads=8,
                                       num_key_value_heads=2, intermediate_size=1376, vocab_size=32000,
                                       max_position_embeddings=512, tie_word_embeddings=False)),
    ],
    ids=["gpt2-small", "llama-gqa"],
)
def test_realistic_size_over_http(tmp_path, model_class, config, embeddings):
    torch.manual_seed(0)
    plain = model_class(config).eval()
    randomize_norms(plain)
    plain.save_pretrained(tmp_path / "plain")
    convert_permute(tmp_path / "plain", tmp_path / "out", tmp_path / "k.safetensors", embeddings=embeddings)
    ids = torch.randint(0, config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    expected = plain.generate(ids, **kwargs)
    with served(str(tmp_path / "out")) as (_, url), torch.no_grad():
        secure = SecureModelForCausalLM.from_pretrained(tmp_path / "out", key=tmp_path / "k.safetensors",
                                                        server_url=url, timeout=300)
        assert (secure(ids, use_cache=False).logits - plain(ids).logits).abs().max().item() < TOL
        assert torch.equal(secure.generate(ids, **kwargs), expected)
