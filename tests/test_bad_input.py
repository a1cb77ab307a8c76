"""Bad input fails closed: missing, foreign, corrupted keys; tampered checkpoints; unknown options."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import hf_secure  # noqa: F401
from hf_secure.errors import (
    CorruptKeyError,
    InvalidInputError,
    KeyMismatchError,
    MissingKeyError,
    NotConvertedError,
    TamperedCheckpointError,
    UnknownOptionError,
)
from hf_secure.keys import KeyStore
from hf_secure.modeling import SecureModelForCausalLM
from hf_secure.server.runtime import ModelServer

from .conftest import TOL, minilm_folder


def _flip_byte(path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_missing_key_says_how_to_get_it(tiny):
    _, folder, _ = tiny("gpt2", "server")
    with pytest.raises(MissingKeyError, match="hf-secure keys import"):
        SecureModelForCausalLM.from_pretrained(folder)
    with pytest.raises(MissingKeyError, match="hf-secure keys import"):
        pipeline("secure-text-generation", model=str(folder))


def test_missing_key_file(tiny, tmp_path):
    _, folder, _ = tiny("gpt2", "server")
    with pytest.raises(MissingKeyError, match="does not exist"):
        SecureModelForCausalLM.from_pretrained(folder, key=tmp_path / "nope.safetensors")


def test_key_store_finds_imported_key(tiny):
    plain, folder, key = tiny("gpt2", "server")
    fp = KeyStore().import_key(key)
    assert fp in {row["fingerprint"] for row in KeyStore().list()}
    model = SecureModelForCausalLM.from_pretrained(folder)  # no key argument
    ids = torch.arange(5, 15)[None]
    with torch.no_grad():
        assert (model(ids).logits - plain(ids).logits).abs().max().item() < TOL
    generator = pipeline("secure-text-generation", model=str(folder))
    assert generator.model.engine is not None


def test_key_of_another_model(tiny):
    _, folder, _ = tiny("gpt2", "server")
    _, _, other_key = tiny("llama", "server")
    with pytest.raises(KeyMismatchError, match="another model"):
        SecureModelForCausalLM.from_pretrained(folder, key=other_key)


@pytest.mark.parametrize("damage", ["data", "header", "truncate", "not_a_key"])
def test_corrupted_key_file(tiny, tmp_path, damage):
    _, folder, key = tiny("gpt2", "server")
    bad = tmp_path / "bad.safetensors"
    shutil.copy(key, bad)
    if damage == "data":
        _flip_byte(bad, 3)
    elif damage == "header":
        data = bytearray(bad.read_bytes())
        data[10] ^= 0x55
        bad.write_bytes(bytes(data))
    elif damage == "truncate":
        bad.write_bytes(bad.read_bytes()[:-17])
    else:
        shutil.copy(folder / "model.safetensors", bad)
    with pytest.raises(CorruptKeyError):
        SecureModelForCausalLM.from_pretrained(folder, key=bad)
    with pytest.raises(CorruptKeyError):
        KeyStore().import_key(bad)


def test_tampered_weights_are_refused(tiny, tmp_path):
    _, folder, key = tiny("gpt2", "server")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    _flip_byte(copy / "model.safetensors")
    with pytest.raises(TamperedCheckpointError, match="model.safetensors"):
        SecureModelForCausalLM.from_pretrained(copy, key=key)
    with pytest.raises(TamperedCheckpointError):
        ModelServer(str(copy))


def test_stripped_config_section_is_refused(tiny, tmp_path):
    import json

    _, folder, key = tiny("gpt2", "server")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    del config["hf_secure"]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotConvertedError, match="hf_secure"):
        SecureModelForCausalLM.from_pretrained(copy, key=key)
    config["hf_secure"] = ["protocol"]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(TamperedCheckpointError, match="malformed"):
        SecureModelForCausalLM.from_pretrained(copy, key=key)


@pytest.mark.parametrize("protocol, command", [("mpc", "hf-secure convert approximate"),
                                               ("permute", "hf-secure convert permute"),
                                               (None, "hf-secure convert")])
def test_a_plain_checkpoint_says_how_to_convert_it(tiny, tmp_path, protocol, command):
    plain, _, _ = tiny("gpt2", "server")
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(NotConvertedError, match=f"not converted.*{command}"):
        SecureModelForCausalLM.from_pretrained(tmp_path / "plain", protocol=protocol)
    with pytest.raises(NotConvertedError, match="not converted"):
        pipeline("secure-text-generation", model=str(tmp_path / "plain"), protocol=protocol)


def test_unknown_options(tiny):
    _, folder, key = tiny("gpt2", "server")
    with pytest.raises(UnknownOptionError, match="colour"):
        SecureModelForCausalLM.from_pretrained(folder, key=key, colour="blue")
    with pytest.raises(UnknownOptionError, match="protocol"):
        SecureModelForCausalLM.from_pretrained(folder, key=key, protocol="magic")
    model = SecureModelForCausalLM.from_pretrained(folder, key=key)
    with pytest.raises(UnknownOptionError, match="output_attentions"):
        model(torch.arange(4)[None], output_attentions=True)
    with pytest.raises(InvalidInputError, match="out of range"):
        model(torch.tensor([[1, 10_000]]))
    with pytest.raises(UnknownOptionError, match="beam search"):
        model.generate(torch.arange(3, 8)[None], num_beams=2, max_new_tokens=3)


def test_pipeline_refuses_a_plain_model(tiny):
    plain, _, _ = tiny("gpt2", "server")
    with pytest.raises(UnknownOptionError, match="SecureModelForCausalLM"):
        pipeline("secure-text-generation", model=plain, tokenizer=AutoTokenizer.from_pretrained(minilm_folder()))


def test_plain_pipeline_on_converted_model_is_not_secure(tiny):
    """Documented behaviour: a converted folder is an ordinary checkpoint; without hf_secure it is garbage."""
    plain, folder, _ = tiny("gpt2", "server")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.arange(3, 12)[None]
    with torch.no_grad():
        assert (loaded(ids).logits - plain(ids).logits).abs().max().item() > 0.1


def test_cli_unknown_option_exits_2():
    out = subprocess.run([sys.executable, "-m", "hf_secure.cli", "convert", "permute", "x", "--out", "y",
                          "--key-out", "z", "--frobnicate"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--frobnicate" in out.stderr


def test_a_stray_safetensors_file_is_never_read(tiny, tmp_path):
    """The checkpoint is what transformers loads (model.safetensors or the index's shards), nothing else."""
    plain, folder, key = tiny("gpt2", "server")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    shutil.copy(key, copy / "zz-extra.safetensors")
    model = SecureModelForCausalLM.from_pretrained(copy, key=key)
    ids = torch.arange(3, 9)[None]
    with torch.no_grad():
        assert (model(ids).logits - plain(ids).logits).abs().max() < TOL
    (copy / "model.safetensors").rename(copy / "other.safetensors")
    with pytest.raises(TamperedCheckpointError, match="model.safetensors"):
        ModelServer(str(copy))


def test_a_sharded_checkpoint_follows_its_index(tmp_path):
    from hf_secure.convert import convert_permute

    from .conftest import make_tiny

    plain = make_tiny("gpt2", tmp_path / "plain")
    plain.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    convert_permute(tmp_path / "sharded", tmp_path / "out", tmp_path / "k.safetensors", embeddings="server")
    model = SecureModelForCausalLM.from_pretrained(tmp_path / "out", key=tmp_path / "k.safetensors")
    ids = torch.arange(3, 9)[None]
    with torch.no_grad():
        assert (model(ids).logits - plain(ids).logits).abs().max() < TOL


def test_checkpoint_files_follow_the_index_and_nothing_else(tmp_path):
    from hf_secure.integrity import checkpoint_files, verify_weights, weight_digests

    from .conftest import make_tiny

    plain = make_tiny("gpt2", tmp_path / "single")
    assert checkpoint_files(tmp_path / "single") == ["model.safetensors"]
    plain.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = checkpoint_files(tmp_path / "sharded")
    assert len(shards) > 1 and all(name.startswith("model-") for name in shards)
    digests = weight_digests(tmp_path / "sharded")
    shutil.copy(tmp_path / "single" / "model.safetensors", tmp_path / "sharded" / "stray.safetensors")
    verify_weights(tmp_path / "sharded", digests)  # the stray file is not part of the checkpoint
    (tmp_path / "sharded" / shards[0]).unlink()
    with pytest.raises(TamperedCheckpointError, match="missing"):
        verify_weights(tmp_path / "sharded", digests)
