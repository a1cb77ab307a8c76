"""The he protocol on decoders: GPT-2 and Llama (grouped-query attention, RoPE, SwiGLU) against
transformers on the same input, the KV cache encrypted on the server, and bad input.

Tolerance: logits within 2e-3 of transformers' (float64 plaintext model, logits of magnitude
~1; the CKKS error of one layer is ~1e-4), and greedy generation token for token. Each query of
these one-layer models takes tens of seconds at N = 2^15, so the tests are few and share models.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, pipeline

from hf_secure import SecureModel, SecureModelForCausalLM
from hf_secure.demo import DEMO_MODEL
from hf_secure.errors import InvalidInputError, ProgramError, ServerError, TamperedCheckpointError, UnsupportedModelError
from hf_secure.modeling.session_cache import RemoteSessionCache
from hf_secure.protocols.he.client import MODEL_PARAMS, HEServer, load_plain
from hf_secure.server.process import served

from .conftest import randomize_norms

TOLERANCE = 2e-3


def make_decoder(folder, config, tokenizer=None):
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).eval()
    randomize_norms(model, 1)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("he-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    model = make_decoder(folder, GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=len(tokenizer),
                                            n_positions=32, bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id), tokenizer)
    return model, folder, tokenizer


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("he-llama")
    model = make_decoder(folder, LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=96, vocab_size=100,
                                             max_position_embeddings=32, rope_theta=100.0))
    return model, folder


def test_gpt2_generation_pipeline(gpt2):
    model, folder, tokenizer = gpt2
    generator = pipeline("secure-text-generation", model=str(folder), protocol="he")
    text = "private inference"
    got = generator(text, max_new_tokens=3, do_sample=False)[0]["generated_text"]
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = tokenizer.decode(model.generate(ids, max_new_tokens=3, do_sample=False,
                                               pad_token_id=tokenizer.eos_token_id)[0])
    assert got == want
    stats, report = generator.secure_stats, generator.model.engine.report()
    assert stats["rounds"] > 3 and report["refreshes"] > 0 and report["evaluation_key_bytes"] > 0
    with pytest.raises(UnsupportedModelError, match="SecureModelForCausalLM"):
        SecureModel.from_pretrained(folder, protocol="he")


def test_llama_left_padded_batch_and_cache(llama):
    model, folder = llama
    secure = SecureModelForCausalLM.from_pretrained(folder, protocol="he")
    ids = torch.tensor([[0, 0, 5, 9, 11], [4, 8, 2, 6, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = secure(ids, attention_mask=mask, use_cache=True)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    assert (out.logits[0, 2:] - want[0, 2:]).abs().max() < TOLERANCE
    assert (out.logits[1] - want[1]).abs().max() < TOLERANCE
    # one more token on the encrypted cache, against transformers on the whole sequence
    nxt = torch.tensor([[7], [3]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    cache = out.past_key_values
    step = secure(nxt, attention_mask=mask2, past_key_values=cache, use_cache=True)
    with torch.no_grad():
        want = model(torch.cat([ids, nxt], 1), attention_mask=mask2).logits[:, -1:]
    assert (step.logits - want).abs().max() < TOLERANCE
    assert cache.get_seq_length() == 6
    # a cache cannot be cropped and continued: refused before anything is sent
    cache.crop(4)
    with pytest.raises(InvalidInputError, match="cannot be cropped"):
        secure(nxt, attention_mask=mask2[:, :5], past_key_values=cache, use_cache=True)
    # longer than the model's positions, or embeddings instead of ids: refused here
    with pytest.raises(InvalidInputError):
        secure(torch.ones(1, 40, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="input_ids"):
        secure(inputs_embeds=torch.zeros(1, 3, 64))
    with pytest.raises(InvalidInputError, match="position ids"):  # RoPE past the model's positions
        secure(nxt[:1], position_ids=torch.tensor([[40]]))
    closed = RemoteSessionCache(secure.engine, secure.engine.open_session())
    closed.close()
    with pytest.raises(InvalidInputError, match="closed"):  # an empty cache too, once closed
        secure(nxt[:1], past_key_values=closed)
    secure.engine.close()
    with pytest.raises(ServerError, match="closed"):
        secure(nxt[:1])


def test_unsupported_decoders_and_damaged_checkpoints(tmp_path, gpt2):
    for name, config in {"relu": GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=20, activation_function="relu"),
                         "unscaled": GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=20, scale_attn_weights=False),
                         "heads": LlamaConfig(num_hidden_layers=1, hidden_size=48, num_attention_heads=4,
                                              intermediate_size=32, vocab_size=20)}.items():
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / name)
        with pytest.raises(UnsupportedModelError, match="he"):  # at loading, before any key is made
            SecureModelForCausalLM.from_pretrained(tmp_path / name, protocol="he")
    _, folder, _ = gpt2
    cut = tmp_path / "cut"
    shutil.copytree(folder, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    with pytest.raises(TamperedCheckpointError):
        SecureModelForCausalLM.from_pretrained(cut, protocol="he")


def test_gpt2_through_a_separate_server(gpt2, tmp_path):
    model, folder, tokenizer = gpt2
    ids = tokenizer("the server holds the cache", return_tensors="pt")["input_ids"]
    with served(str(folder), args=("--protocol", "he")) as (_, url):
        # the client holds the config, the tokenizer and the token and position tables only (the
        # LM head is the token table)
        client_dir = tmp_path / "client"
        model.config.save_pretrained(client_dir)
        tokenizer.save_pretrained(client_dir)
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k.startswith(("transformer.wte.",
                                                                                              "transformer.wpe."))},
                  client_dir / "model.safetensors")
        secure = SecureModelForCausalLM.from_pretrained(client_dir, protocol="he", server_url=url, timeout=60)
        got = secure.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert torch.equal(got, want)
        assert secure.engine.report()["refreshes"] > 0
        secure.engine.close()


def test_decoder_queries_that_do_not_fit(gpt2):
    _, folder, _ = gpt2
    plain = load_plain(str(folder), AutoModelForCausalLM.from_pretrained(folder).config)
    server = HEServer.from_model(str(folder), plain, MODEL_PARAMS)
    ones = np.ones

    def check(block, count=1, valid=ones(5), cache="1/0", past=0, positions=np.arange(5)):
        server.check_query(block, count, valid, cache, past, positions)

    check(8)  # fits
    for bad in (dict(block=16), dict(count=2), dict(valid=ones(4)), dict(cache=None), dict(past=3),
                dict(positions=np.arange(5) + 30), dict(block=64, valid=ones(40), positions=np.arange(40))):
        with pytest.raises(ProgramError):
            check(**{"block": 8, **bad})
