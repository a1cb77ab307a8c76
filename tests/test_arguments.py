"""Client models take an explicit list of arguments: each is supported exactly or refused, never dropped.

Also the upstream drift these arguments went through: transformers 5.24 renamed ``past_key_values``
to ``cache``; both names work on every supported release (CI runs this file on the lowest one too).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import hf_secure  # noqa: F401
from hf_secure import SecureModelForCausalLM
from hf_secure.compat import CACHE_NAME
from hf_secure.errors import InvalidInputError, KeyMaterialUploadError, UnknownOptionError
from hf_secure.modeling.session_cache import RemoteSessionCache

from .conftest import TOL, VOCAB

MODES = ("client", "server")


def _ids(shape, seed=0, low=3):
    return torch.randint(low, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_both_cache_names_continue_a_forward(tiny, name):
    plain, folder, key = tiny("gpt2", "client")
    secure = SecureModelForCausalLM.from_pretrained(folder, key=key)
    ids = _ids((1, 10))
    with torch.no_grad():
        expected = plain(ids).logits
        first = secure(ids[:, :6])
        cache = getattr(first, CACHE_NAME)
        assert isinstance(cache, RemoteSessionCache) and cache.get_seq_length() == 6
        second = secure(ids[:, 6:], **{name: cache})
    assert cache.get_seq_length() == 10
    assert (second.logits - expected[:, 6:]).abs().max() < TOL
    with pytest.raises(UnknownOptionError, match="not both"):
        secure(ids[:, 6:], cache=cache, past_key_values=cache)


def test_an_empty_transformers_cache_starts_a_session(tiny):
    """An empty cache is falsy: it must still be honoured (here: replaced by a server session)."""
    plain, folder, key = tiny("gpt2", "client")
    secure = SecureModelForCausalLM.from_pretrained(folder, key=key)
    ids = _ids((1, 5))
    out = secure(ids, **{CACHE_NAME: DynamicCache()})
    assert isinstance(getattr(out, CACHE_NAME), RemoteSessionCache)
    assert getattr(out, CACHE_NAME).get_seq_length() == 5
    with torch.no_grad():
        filled = plain(ids, use_cache=True)
    with pytest.raises(InvalidInputError, match="RemoteSessionCache"):
        secure(ids, **{CACHE_NAME: getattr(filled, CACHE_NAME)})


def test_unknown_and_unhonoured_arguments_are_refused(tiny):
    _, folder, key = tiny("gpt2", "client")
    secure = SecureModelForCausalLM.from_pretrained(folder, key=key)
    ids = _ids((2, 6))
    with pytest.raises(UnknownOptionError, match="cache_position"):
        secure(ids, cache_position=torch.arange(6))
    with pytest.raises(UnknownOptionError, match="output_hidden_states"):
        secure(ids, output_hidden_states=True)
    with pytest.raises(UnknownOptionError, match="bool"):  # a tensor flag is refused, not judged by truthiness
        secure(ids, output_attentions=torch.tensor([False, True]))
    with pytest.raises(UnknownOptionError, match="use_cache"):
        secure(ids, use_cache="yes")
    with pytest.raises(InvalidInputError, match="attention_mask"):
        secure(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="attention_mask"):
        secure(ids, attention_mask=torch.full((2, 6), 2))
    with pytest.raises(InvalidInputError, match="position_ids"):
        secure(ids, position_ids=torch.arange(7)[None])
    with pytest.raises(InvalidInputError, match="logits_to_keep"):
        secure(ids, logits_to_keep=-1)
    with pytest.raises(InvalidInputError, match="logits_to_keep"):  # a bool mask is not a list of positions
        secure(ids, logits_to_keep=torch.tensor([True, False, False, False, False, True]))
    with pytest.raises(InvalidInputError, match="positions"):
        secure(_ids((1, 129)))  # the tiny GPT-2 has 128 learned positions


def test_return_dict_false_gives_a_tuple(tiny):
    plain, folder, key = tiny("gpt2", "client")
    secure = SecureModelForCausalLM.from_pretrained(folder, key=key)
    ids = _ids((1, 5))
    out = secure(ids, return_dict=False, use_cache=False)
    assert isinstance(out, tuple)
    with torch.no_grad():
        assert (out[0] - plain(ids).logits).abs().max() < TOL


@pytest.mark.parametrize("embeddings", MODES)
def test_gpt2_token_type_ids_are_embedded_as_gpt2_does(tiny, embeddings):
    """GPT-2 adds wte(token_type_ids): zeros are not a no-op, and a wrong shape is refused."""
    plain, folder, key = tiny("gpt2", embeddings)
    secure = SecureModelForCausalLM.from_pretrained(folder, key=key)
    ids = _ids((2, 6))
    for types in (torch.zeros(2, 6, dtype=torch.long), _ids((2, 6), seed=5, low=0)):
        with torch.no_grad():
            expected = plain(ids, token_type_ids=types).logits
            got = secure(ids, token_type_ids=types).logits
        assert (got - expected).abs().max() < TOL
    with torch.no_grad():
        assert (secure(ids).logits - plain(ids).logits).abs().max() < TOL
        assert (plain(ids).logits - plain(ids, token_type_ids=torch.zeros_like(ids)).logits).abs().max() > 1e-3
    with pytest.raises(InvalidInputError, match="token_type_ids"):
        secure(ids, token_type_ids=torch.tensor([[0]]))
    with pytest.raises(InvalidInputError, match="token_type_ids"):
        secure(ids, token_type_ids=torch.full((2, 6), VOCAB))


def test_llama_has_no_token_types(tiny):
    _, folder, key = tiny("llama", "client")
    secure = SecureModelForCausalLM.from_pretrained(folder, key=key)
    with pytest.raises(UnknownOptionError, match="token types"):
        secure(_ids((1, 4)), token_type_ids=torch.zeros(1, 4, dtype=torch.long))


def _left_padded_batch():
    ids = _ids((3, 9), seed=11)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ids[mask == 0] = 0  # pad id
    return ids, mask


@pytest.mark.parametrize("embeddings", MODES)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_left_padded_generation_equals_plaintext(tiny, family, embeddings):
    plain, folder, key = tiny(family, embeddings)
    secure = SecureModelForCausalLM.from_pretrained(folder, key=key)
    ids, mask = _left_padded_batch()
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = plain.generate(ids, attention_mask=mask, **kwargs)
    got = secure.generate(ids, attention_mask=mask, **kwargs)
    for row in range(ids.shape[0]):
        assert torch.equal(got[row], expected[row]), f"row {row}"


@pytest.mark.parametrize("name", sorted({"past_key_values", CACHE_NAME}))  # generate() of < 5.24 knows no `cache`
def test_generation_continues_from_the_cache_generate_returned(tiny, name):
    plain, folder, key = tiny("gpt2", "client")
    secure = SecureModelForCausalLM.from_pretrained(folder, key=key)
    ids = _ids((1, 7), seed=4)
    kwargs = dict(do_sample=False, pad_token_id=0)
    first = secure.generate(ids, max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True, **kwargs)
    cache = first[CACHE_NAME]
    assert isinstance(cache, RemoteSessionCache)
    more = torch.cat([first.sequences, _ids((1, 2), seed=8)], dim=1)
    got = secure.generate(more, max_new_tokens=6, min_new_tokens=6, **{name: cache}, **kwargs)
    expected = plain.generate(more, max_new_tokens=6, min_new_tokens=6, **kwargs)
    assert torch.equal(got, expected)
    assert cache.get_seq_length() == more.shape[1] + 5


def test_pipeline_arguments_are_honoured_or_refused(tiny):
    from transformers import AutoTokenizer, pipeline

    from .conftest import minilm_folder

    plain, folder, key = tiny("gpt2", "client")
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())  # any tokenizer: ids below VOCAB are checked
    generator = pipeline("secure-text-generation", model=str(folder), key=str(key), tokenizer=tokenizer)
    with pytest.raises((UnknownOptionError, ValueError), match="colour"):
        generator("hello", max_new_tokens=2, colour="blue")
    with pytest.raises(UnknownOptionError, match="output_attentions"):
        generator("hello", max_new_tokens=2, output_attentions=True)
    with pytest.raises(UnknownOptionError, match="already bound"):
        pipeline("secure-text-generation", model=generator.model, tokenizer=tokenizer, key=str(key))
    with pytest.raises(UnknownOptionError, match="already bound"):
        pipeline("secure-text-generation", model=generator.model, tokenizer=tokenizer, reveal="token")
    with pytest.raises(UnknownOptionError, match="available"):  # an unknown protocol name lists the registered ones
        pipeline("secure-text-generation", model=str(folder), key=str(key), tokenizer=tokenizer, protocol="bogus")
    _, bert_folder, bert_key = tiny("bert", "client")
    with pytest.raises(UnknownOptionError, match="no LM head"):  # an encoder is not a causal LM
        SecureModelForCausalLM.from_pretrained(bert_folder, key=bert_key)
    with pytest.raises(UnknownOptionError, match="reveal: not an option of the permute protocol"):
        pipeline("secure-text-generation", model=str(folder), key=str(key), tokenizer=tokenizer, reveal="token")


def test_encoder_arguments_are_checked(tiny):
    from hf_secure import SecureModel

    plain, folder, key = tiny("bert", "client")
    secure = SecureModel.from_pretrained(folder, key=key)
    ids = _ids((2, 7))
    types = torch.tensor([[0] * 4 + [1] * 3] * 2)
    with torch.no_grad():
        expected = plain(ids, token_type_ids=types).last_hidden_state
        assert (secure(ids, token_type_ids=types).last_hidden_state - expected).abs().max() < TOL
    with pytest.raises(UnknownOptionError, match="head_mask"):
        secure(ids, head_mask=torch.ones(2, 4))
    with pytest.raises(InvalidInputError, match="token_type_ids"):
        secure(ids, token_type_ids=torch.tensor([[0]]))
    with pytest.raises(InvalidInputError, match="token_type_ids"):
        secure(ids, token_type_ids=torch.full((2, 7), 5))  # BERT has 2 token types
    with pytest.raises(UnknownOptionError, match="bool"):
        secure(ids, output_hidden_states=torch.tensor(1))
    assert isinstance(secure(ids, return_dict=False), tuple)


def test_generate_with_stop_strings_and_save_pretrained_without_the_key(tiny, tmp_path):
    import shutil
    from pathlib import Path

    from transformers import AutoTokenizer

    from transformers import AutoModelForCausalLM

    from hf_secure.convert import convert_permute
    from hf_secure.demo import DEMO_MODEL, DEMO_PROMPT

    folder, key = tmp_path / "demo", tmp_path / "demo.key.safetensors"
    convert_permute(str(DEMO_MODEL), folder, key)
    plain = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    secure = SecureModelForCausalLM.from_pretrained(folder, key=key)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(DEMO_PROMPT, return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=24, do_sample=False, stop_strings=[" the"], tokenizer=tokenizer)
    expected = plain.generate(ids, **kwargs)
    assert expected.shape[1] < ids.shape[1] + 24  # the stop string ended it early
    assert torch.equal(secure.generate(ids, **kwargs), expected)
    stray = Path(secure.folder) / "client.key.safetensors"
    shutil.copy(key, stray)
    try:
        with pytest.raises(KeyMaterialUploadError, match="client.key"):
            secure.save_pretrained(tmp_path / "saved")
    finally:
        stray.unlink()
    (Path(secure.folder) / "notes.txt").write_text("not part of the checkpoint")
    secure.save_pretrained(tmp_path / "saved")
    saved = {p.name for p in (tmp_path / "saved").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= saved and "notes.txt" not in saved


def test_converters_refuse_an_already_converted_checkpoint(tiny, tmp_path):
    from hf_secure.convert import convert_approximate, convert_permute
    from hf_secure.errors import UnsupportedModelError

    _, folder, _ = tiny("gpt2", "client")
    with pytest.raises(UnsupportedModelError, match="already converted"):
        convert_permute(folder, tmp_path / "again", tmp_path / "k.safetensors")
    with pytest.raises(UnsupportedModelError, match="already converted"):
        convert_approximate(folder, tmp_path / "approx")
