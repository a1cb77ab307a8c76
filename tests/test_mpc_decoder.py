"""GPT-2 and Llama through the mpc protocol: logits against plaintext, KV cache as shares, generation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import hf_secure  # noqa: F401  (registers the approximated model types and the secure pipelines)
from hf_secure import SecureModel, SecureModelForCausalLM
from hf_secure.compat import CACHE_NAME
from hf_secure.convert import convert_approximate
from hf_secure.demo import DEMO_MODEL
from hf_secure.errors import InvalidInputError, UnknownOptionError
from hf_secure.protocols.mpc.approximations import Approximations
from hf_secure.families import family
from hf_secure.protocols.mpc.client import calibrate
from hf_secure.protocols.mpc.run import MPCSession

from .conftest import make_tiny

DEMO = str(DEMO_MODEL)  # the embedded demo GPT-2 (trained on Jane Austen) and its tokenizer
ACTIVATIONS = {"gpt2": "secformer_gelu", "llama": "series_silu", "mistral": "series_silu", "qwen2": "series_silu"}
LOGIT_TOL = 0.03  # approximations (segmented GeLU/SiLU, exp, Goldschmidt) plus fixed point, on logits of size ~1


def _public(mask, past, positions, keep=0, drop=(), token_only=False):
    return {"attention_mask": mask, "position_ids": positions, "cache": torch.tensor([7]),
            "past_length": torch.tensor([past]), "logits_to_keep": torch.tensor([keep]),
            "drop": torch.tensor(list(drop), dtype=torch.long), "token_only": torch.tensor([int(token_only)])}


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral", "qwen2"])
def test_decoder_logits_match_plaintext_with_cache_and_padding(tmp_path, name):
    """Prompt (one row left-padded), two cached steps, then a crop back into the cache."""
    program_class, activation = family(name).program, ACTIVATIONS[name]
    model = make_tiny(name, tmp_path / name)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    approx = Approximations(activation=activation, softmax="exact",
                            ln_bounds=calibrate(model, name, input_ids=ids, attention_mask=mask))
    weights = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, position_ids=positions).logits
    valid = mask.bool()
    with MPCSession(program_class.from_config(model.config, approx), weights, timeout_s=60) as session:
        onehot = torch.nn.functional.one_hot(ids, model.config.vocab_size)
        (prompt,), report = session.run([onehot[:, :8]], _public(mask[:, :8], 0, positions[:, :8]))
        assert (prompt - expected[:, :8])[valid[:, :8]].abs().max() < LOGIT_TOL
        for past in (8, 9):  # one new token each, logits of the last position only
            (step,), _ = session.run([onehot[:, past : past + 1]],
                                     _public(mask[:, : past + 1], past, positions[:, past : past + 1], keep=1))
            assert step.shape == (2, 1, model.config.vocab_size)
            assert (step - expected[:, past : past + 1]).abs().max() < LOGIT_TOL
        (crop,), _ = session.run([onehot[:, 6:]], _public(mask, 6, positions[:, 6:]))
        assert (crop - expected[:, 6:]).abs().max() < LOGIT_TOL
    assert {f"layer.{i}" for i in range(model.config.num_hidden_layers)} <= set(report["SERVER0"]["stats"])


def _tiny_llama_with_tokenizer(folder):
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    make_tiny("llama", folder, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(folder)


def test_gpt2_greedy_generation_through_mpc_pipeline_equals_plaintext(tmp_path):
    """The embedded demo GPT-2 (a trained model), 16 new tokens, through secure-text-generation."""
    section = convert_approximate(DEMO, tmp_path / "approx")
    assert section["family"] == "gpt2" and section["approximations"]["activation"] == "secformer_gelu"
    prompt = "It is a truth universally acknowledged"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "approx")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = {}
    for name, folder in (("original", DEMO), ("approximated", tmp_path / "approx")):
        plain = AutoModelForCausalLM.from_pretrained(folder).eval()
        expected[name] = plain.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
    generator = pipeline("secure-text-generation", model=str(tmp_path / "approx"), protocol="mpc")
    revealed, logits = [], generator.model.engine.logits

    def recording(*args):  # what each query reveals to the client: logits of how many positions
        out = logits(*args)
        revealed.append(out.shape[1])
        return out

    generator.model.engine.logits = recording
    try:
        text = generator(prompt, max_new_tokens=16, do_sample=False, return_full_text=False)[0]["generated_text"]
        assert revealed == [1] * 16  # generation reveals the last position's logits only, prompt included
        got = tokenizer(text, return_tensors="pt").input_ids[0]
        assert text == tokenizer.decode(expected["approximated"])
        assert torch.equal(got, expected["approximated"]) and torch.equal(got, expected["original"])
        report = generator.model.secure_report()
        assert report["DEALER"]["offline_bytes"] > 0
        assert report["bounds"] == {"sine_opening_leak": 0.0, "truncation_failure": 0.0}
        assert {"layer.0", "layer.3", "lm_head"} <= set(report["SERVER0"]["stats"])
        assert generator.secure_stats["rounds"] > 16 * 4
    finally:
        generator.model.engine.close()


def test_generation_revealing_only_tokens_equals_plaintext_and_refuses_what_needs_logits(tmp_path):
    """reveal="token": the servers compute each step's argmax on shares; the client receives one
    integer per generated token, never a logit, and greedy generation still equals plaintext's."""
    convert_approximate(DEMO, tmp_path / "approx")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "approx")
    prompt = "It is a truth universally acknowledged"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "approx").eval()
    expected = plain.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    generator = pipeline("secure-text-generation", model=str(tmp_path / "approx"), protocol="mpc", reveal="token")
    model, received = generator.model, []
    run = model.engine.session.run

    def recording(inputs, public):  # what the client reconstructs from the servers' shares
        outputs, reports = run(inputs, public)
        received.extend(outputs)
        return outputs, reports

    model.engine.session.run = recording
    try:
        # the pipeline's own default is sampling; a model that reveals only tokens makes it greedy
        text = generator(prompt, max_new_tokens=8, return_full_text=False)[0]["generated_text"]
        assert text == tokenizer.decode(expected)
        assert [tuple(out.shape) for out in received] == [(1, 1)] * 8  # one token id per step, no vocabulary axis
        assert [int(out.item()) for out in received] == expected.tolist()
        assert set(model.secure_report()["SERVER0"]["stats"]) >= {"lm_head", "argmax"}
        with torch.no_grad():
            logits = model(ids).logits  # every position's token, as point-mass logits
        assert torch.equal(logits.argmax(-1), plain(ids).logits.argmax(-1))
        assert torch.equal((logits == 0).sum(-1), torch.ones_like(ids)) and torch.isinf(logits).sum() == ids.numel() * 2047
        for option in ({"do_sample": True}, {"num_beams": 2}, {"repetition_penalty": 1.3}, {"min_new_tokens": 4},
                       {"output_scores": True, "return_dict_in_generate": True}, {"no_repeat_ngram_size": 2},
                       {"prefix_allowed_tokens_fn": lambda batch, sent: [1]}):
            with pytest.raises(UnknownOptionError, match=next(iter(option))):
                model.generate(ids, max_new_tokens=2, **option)
        from transformers import LogitsProcessorList, MinLengthLogitsProcessor
        with pytest.raises(UnknownOptionError, match="logits_processor"):
            model.generate(ids, max_new_tokens=2, logits_processor=LogitsProcessorList([MinLengthLogitsProcessor(5, 0)]))
        with pytest.raises(UnknownOptionError, match="labels"):
            model(ids, labels=ids)
        with pytest.raises(UnknownOptionError, match="last n positions"):  # would compute every position's token
            model(ids, logits_to_keep=torch.tensor([0, 2]))
        # a processor set in the checkpoint's generation config is refused also when the caller
        # passes a generation config of its own (transformers fills the unset fields from the model's)
        from transformers import GenerationConfig
        model.generation_config.suppress_tokens = [14]
        with pytest.raises(UnknownOptionError, match="suppress_tokens"):
            model.generate(ids, generation_config=GenerationConfig(max_new_tokens=2))
        model.generation_config.suppress_tokens = None
        # neutral values of processors are not processors
        assert model.generate(ids, max_new_tokens=2, do_sample=False, repetition_penalty=1.0, min_new_tokens=0,
                              no_repeat_ngram_size=0).shape[1] == ids.shape[1] + 2
        # greedy settings that do not read logits stay available
        assert model.generate(ids, max_new_tokens=3, do_sample=False, temperature=0.7, top_k=5).shape[1] == ids.shape[1] + 3
    finally:
        model.engine.close()
    with pytest.raises(UnknownOptionError, match="reveal"):
        SecureModelForCausalLM.from_pretrained(tmp_path / "approx", protocol="mpc", reveal="probabilities")
    with pytest.raises(UnknownOptionError, match="runs as SecureModelForCausalLM"):  # what is wrong comes first
        SecureModel.from_pretrained(tmp_path / "approx", protocol="mpc", reveal="token")


def test_llama_greedy_generation_through_mpc_equals_plaintext_and_rejects_bad_input(tmp_path):
    _tiny_llama_with_tokenizer(tmp_path / "llama")
    convert_approximate(tmp_path / "llama", tmp_path / "approx")
    ids = AutoTokenizer.from_pretrained(tmp_path / "approx")("My dear Mr. Bennet", return_tensors="pt").input_ids
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "approx").eval()
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    expected = plain.generate(ids, max_new_tokens=16, do_sample=False)
    with pytest.raises(UnknownOptionError, match="SecureModelForCausalLM"):
        SecureModel.from_pretrained(tmp_path / "approx", protocol="mpc")
    model = SecureModelForCausalLM.from_pretrained(tmp_path / "approx", protocol="mpc")
    try:
        got = model.generate(ids, max_new_tokens=16, do_sample=False)
        assert torch.equal(got, expected)
        assert torch.equal(got, original.generate(ids, max_new_tokens=16, do_sample=False))
        with torch.no_grad():
            logits = model(ids).logits
            assert (logits - plain(ids).logits).abs().max() < LOGIT_TOL
        with pytest.raises(InvalidInputError, match="input_ids"):
            model(inputs_embeds=torch.zeros(1, 3, 64))
        with pytest.raises(InvalidInputError, match="range"):
            model(torch.tensor([[1, 10**6]]))
        cache = getattr(model(ids, use_cache=True), CACHE_NAME)
        cache.length += 5  # claims tokens the servers never saw
        with pytest.raises(InvalidInputError, match="cannot continue"):
            model(ids[:, :1], past_key_values=cache)
    finally:
        model.engine.close()
    with pytest.raises(UnknownOptionError, match="key"):
        SecureModelForCausalLM.from_pretrained(tmp_path / "approx", protocol="mpc", key="some.key")
