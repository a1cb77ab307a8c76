"""push_to_hub of converted checkpoints against a local Hub stand-in, and loading them back by repo id."""

from __future__ import annotations

import shutil

import pytest
import torch

from safetensors.torch import load_file, save_file

from hf_secure.errors import KeyMaterialUploadError, TamperedCheckpointError, UnknownOptionError
from hf_secure.hub import push_converted
from hf_secure.modeling import SecureModelForCausalLM

from .hub_stub import LocalHub


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with LocalHub() as local:
        local.patch_in_process(monkeypatch, tmp_path / "hub-cache")
        yield local
        assert local.unhandled == []


def test_push_and_load_back(hub, tiny):
    plain, folder, key = tiny("gpt2", "client")
    push_converted(folder, "owner/secure-gpt2", token="x")
    files = hub.files("owner/secure-gpt2")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert "Threat model" in card and "permute" in card and "No key material" in card
    assert not any("key" in name for name in files)

    secure = SecureModelForCausalLM.from_pretrained("owner/secure-gpt2", key=key)
    ids = torch.arange(5, 14)[None]
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert torch.equal(secure.generate(ids, **kwargs), plain.generate(ids, **kwargs))

    # The client model's own push_to_hub uploads the converted checkpoint, never its key.
    secure.push_to_hub("owner/copy", token="x")
    assert hub.files("owner/copy")["model.safetensors"] == files["model.safetensors"]


def _resaved_without_metadata(key, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(key)), str(path))  # the key's tensors, no hf_secure metadata


@pytest.mark.parametrize("name", ["client.key.safetensors", "weights.safetensors", "backup/client.safetensors.bak",
                                  ".hidden/k", "a/b/c/model.safetensors", "tokenizer.json", "stripped/key.bin"])
@pytest.mark.parametrize("embeddings", ["client", "server"])
def test_push_refuses_key_material(hub, tiny, tmp_path, name, embeddings):
    """Renamed, nested, hidden-folder copies of the key, and a copy without its metadata."""
    _, folder, key = tiny("gpt2", embeddings)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    if name.startswith("stripped/"):
        _resaved_without_metadata(key, copy / name)
    else:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(key, copy / name)  # a key under an innocent name is caught by its content
    with pytest.raises(KeyMaterialUploadError, match=name):
        push_converted(copy, "owner/leaky", token="x")
    with pytest.raises(KeyError):
        hub.files("owner/leaky")  # nothing was created, let alone uploaded


def test_push_refuses_a_key_under_a_weight_or_public_file_name(hub, tiny, tmp_path):
    _, folder, key = tiny("gpt2", "client")
    cases = {"weights": lambda d: shutil.copy(key, d / "model.safetensors"),
             "padded": lambda d: save_file({**load_file(str(key)), "extra": torch.zeros(1)}, str(d / "tokenizer.model")),
             "link": lambda d: (d / "linked.safetensors").symlink_to(key)}
    for name, plant in cases.items():
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        plant(copy)
        with pytest.raises((KeyMaterialUploadError, TamperedCheckpointError)):
            push_converted(copy, f"owner/{name}", token="x")
        with pytest.raises(KeyError):
            hub.files(f"owner/{name}")


def test_push_uploads_only_the_allow_list(hub, tiny, tmp_path):
    _, folder, _ = tiny("gpt2", "client")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "notes.txt").write_text("private notes")
    (copy / "stray.safetensors").write_bytes((copy / "model.safetensors").read_bytes())
    (copy / ".git").mkdir()
    (copy / ".git" / "config").write_text("[core]")
    push_converted(copy, "owner/tidy", token="x")
    files = set(hub.files("owner/tidy"))
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= files
    assert not files & {"notes.txt", "stray.safetensors", ".git/config"}
    with pytest.raises(UnknownOptionError, match="allow_patterns"):
        push_converted(copy, "owner/tidy", token="x", allow_patterns=["*"])


def test_push_refuses_unconverted_model(hub, tiny, tmp_path):
    plain, _, _ = tiny("gpt2", "server")
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(KeyMaterialUploadError, match="not a converted"):
        push_converted(tmp_path / "plain", "owner/plain", token="x")
