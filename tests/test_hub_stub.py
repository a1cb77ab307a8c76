"""End-to-end checks of tests/hub_stub.py: push to and load from the in-memory LocalHub, all offline."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2
import pytest
import torch
import transformers
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import _http as hf_http

from .hub_stub import LocalHub


@pytest.fixture(autouse=True)
def _online_in_this_process(monkeypatch):
    """Even with HF_HUB_OFFLINE=1 in the environment, let this process talk to the (local) hub."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


TINY_CONFIG = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)


def _tiny_gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY_CONFIG))


def _save_tiny_model_and_tokenizer(folder: Path) -> Path:
    """A random tiny GPT-2 plus a word-level tokenizer (built locally, nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    _tiny_gpt2().save_pretrained(folder)
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 100)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    return folder


def test_upload_folder_then_load_and_push_in_subprocess(tmp_path):
    folder = _save_tiny_model_and_tokenizer(tmp_path / "tiny")
    with LocalHub() as hub:
        api = HfApi(endpoint=hub.endpoint, token="x")
        api.create_repo("user/tiny", repo_type="model")
        api.create_repo("user/tiny", repo_type="model", exist_ok=True)  # 409 + exist_ok is accepted
        api.upload_folder(repo_id="user/tiny", folder_path=folder, repo_type="model")

        local_files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        assert hub.files("user/tiny") == local_files
        assert "model.safetensors" in local_files

        # Everything the client side does happens in a fresh interpreter, configured only by environment.
        script = textwrap.dedent(
            """
            import sys, torch, transformers
            from huggingface_hub import snapshot_download
            folder = sys.argv[1]
            remote = transformers.AutoModelForCausalLM.from_pretrained("user/tiny")
            local = transformers.AutoModelForCausalLM.from_pretrained(folder)
            sd_r, sd_l = remote.state_dict(), local.state_dict()
            assert sd_r.keys() == sd_l.keys()
            assert all(torch.equal(sd_r[k], sd_l[k]) for k in sd_l), "weights differ"
            tok = transformers.AutoTokenizer.from_pretrained("user/tiny")
            assert tok("w1 w2 nope")["input_ids"] == [1, 2, 0], tok("w1 w2 nope")
            snap = snapshot_download("user/tiny")
            assert snap.startswith(sys.argv[2]), snap  # the fresh HF_HOME was used
            remote.push_to_hub("user/tiny2", token="x")
            print("CHILD-OK")
            """
        )
        hf_home = tmp_path / "hf_home"
        result = subprocess.run(
            [sys.executable, "-c", script, str(folder), str(hf_home)],
            env=hub.subprocess_env(hf_home),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0 and "CHILD-OK" in result.stdout, (
            f"child failed\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}\nrequests: {hub.requests}"
        )

        pushed = hub.files("user/tiny2")
        assert {"config.json", "model.safetensors"} <= pushed.keys()
        assert pushed["model.safetensors"] == local_files["model.safetensors"]  # same weights, same bytes
        assert hub.unhandled == []
        # The child really went through the stub (and not through some cache).
        assert any(r.startswith("GET /user/tiny/resolve/") for r in hub.requests)


def test_in_process_patch_and_repeated_commits(tmp_path, monkeypatch):
    """`patch_in_process` is enough for transformers in this process; nothing leaves 127.0.0.1."""

    def only_loopback(request: httpx2.Request) -> None:
        assert request.url.host == "127.0.0.1", f"request escaped the LocalHub: {request.url}"
        hf_http.hf_request_event_hook(request)

    hf_http.set_client_factory(
        lambda: httpx2.Client(event_hooks={"request": [only_loopback]}, follow_redirects=True, timeout=30)
    )
    try:
        with LocalHub() as hub:
            hub.patch_in_process(monkeypatch, tmp_path / "cache")
            model = _tiny_gpt2()
            model.push_to_hub("user/tiny", token="x")
            first = hub.commits("user/tiny")[-1]

            loaded = transformers.AutoModelForCausalLM.from_pretrained("user/tiny")
            for key, value in model.state_dict().items():
                assert torch.equal(value, loaded.state_dict()[key]), key

            # A second commit gets a new sha and shows up on the next load (the cache is keyed by commit).
            with torch.no_grad():
                model.transformer.wte.weight.add_(1.0)
            model.push_to_hub("user/tiny", token="x")
            assert hub.commits("user/tiny")[-1] != first
            reloaded = transformers.AutoModelForCausalLM.from_pretrained("user/tiny")
            assert torch.equal(reloaded.transformer.wte.weight, model.transformer.wte.weight)
            assert not torch.equal(reloaded.transformer.wte.weight, loaded.transformer.wte.weight)
            assert hub.unhandled == []
    finally:
        hf_http.set_client_factory(hf_http.default_client_factory)


def test_errors_look_like_the_hub(tmp_path):
    with LocalHub() as hub:
        api = HfApi(endpoint=hub.endpoint, token="x")
        api.create_repo("user/empty")
        with pytest.raises(EntryNotFoundError):
            hf_hub_download("user/empty", "config.json", endpoint=hub.endpoint, cache_dir=tmp_path)
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("user/missing")
        api.upload_file(path_or_fileobj=b"hello", path_in_repo="a/b.txt", repo_id="user/empty")
        info = api.model_info("user/empty")
        assert [s.rfilename for s in info.siblings] == ["a/b.txt"] and info.sha == hub.commits("user/empty")[-1]
        assert [f.path for f in api.list_repo_tree("user/empty")] == ["a"]
        downloaded = hf_hub_download("user/empty", "a/b.txt", endpoint=hub.endpoint, cache_dir=tmp_path)
        assert Path(downloaded).read_bytes() == b"hello"
        api.delete_file("a/b.txt", repo_id="user/empty")
        assert hub.files("user/empty") == {}
        assert hub.unhandled == []
