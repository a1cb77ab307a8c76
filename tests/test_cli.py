"""The hf-secure command line: convert, keys, generate; failures in one line that names the fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from huggingface_hub import HfApi
from transformers import AutoTokenizer

from hf_secure.cli import main
from hf_secure.convert import convert_approximate, convert_permute
from hf_secure.errors import ModelNotFoundError
from hf_secure.keys import KeyStore, key_store_dir

from .conftest import make_tiny, minilm_folder
from .hub_stub import LocalHub


def test_console_script_is_installed():
    exe = shutil.which("hf-secure")
    assert exe is not None
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "convert" in out.stdout and "serve" in out.stdout


def test_convert_import_generate(tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())  # any real tokenizer will do
    make_tiny("gpt2", tmp_path / "plain", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(tmp_path / "plain")
    key = tmp_path / "client.key.safetensors"
    assert main(["convert", "permute", str(tmp_path / "plain"), "--out", str(tmp_path / "out"),
                 "--key-out", str(key), "--embeddings", "server"]) == 0
    assert main(["keys", "import", str(key)]) == 0
    assert len(KeyStore().list()) == 1
    capsys.readouterr()

    assert main(["generate", str(tmp_path / "out"), "--prompt", "hello world", "--max-new-tokens", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    stats = json.loads(lines[-1])
    assert stats["rounds"] == 5

    fp = KeyStore().list()[0]["fingerprint"]
    assert main(["keys", "remove", fp]) == 0
    assert main(["generate", str(tmp_path / "out"), "--prompt", "hello"]) == 1
    assert "hf-secure keys import" in capsys.readouterr().err


def _run(args, env=None, cwd=None):
    """The installed console script, as a user runs it (the Hub unreachable unless ``env`` says otherwise)."""
    env = env or dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([shutil.which("hf-secure"), *args], capture_output=True, text=True, timeout=300, env=env,
                          cwd=cwd)


def _one_line_error(out) -> str:
    """Exit status 1 and a single line on stderr, without a traceback; that line."""
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("hf-secure: error: ")
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (["convert", "permute", "/no/such/model", "--out", "OUT", "--key-out", "KEY"], "/no/such/model does not exist"),
    (["convert", "approximate", "./no-such-dir", "--out", "OUT"], "./no-such-dir does not exist"),
    (["serve", "./no-such-dir"], "./no-such-dir does not exist: give the path of a model folder"),
    (["generate", "./no-such-dir", "--prompt", "hi"], "./no-such-dir does not exist"),
    (["demo", "--model", "a/b"], "a/b is not a local folder, and the Hub cannot be reached"),
])
def test_bad_model_name_fails_in_one_line(tmp_path, args, says):
    args = [str(tmp_path / a) if a in ("OUT", "KEY") else a for a in args]
    line = _one_line_error(_run(args, dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")), tmp_path))
    assert "ModelNotFoundError" in line and says in line


@pytest.mark.parametrize("flag_first", [True, False])
def test_verbose_adds_the_traceback_before_or_after_the_command(flag_first):
    out = _run(["-v", "serve", "./no-such-dir"] if flag_first else ["serve", "./no-such-dir", "--verbose"])
    assert out.returncode == 1 and "Traceback" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("hf-secure: error: ModelNotFoundError: ./no-such-dir")


def test_missing_repo_and_revision_on_the_hub_fail_in_one_line(tmp_path):
    with LocalHub() as hub:
        HfApi(endpoint=hub.endpoint, token="x").create_repo("user/model")
        env = hub.subprocess_env(tmp_path / "hf")
        line = _one_line_error(_run(["serve", "user/missing"], env))
        assert "user/missing is neither a local folder nor a model on the Hub" in line
        line = _one_line_error(_run(["serve", "user/model", "--revision", "v9"], env))
        assert "user/model has no revision 'v9' on the Hub" in line


def test_usage_errors_exit_2_without_traceback():
    out = _run(["convert", "permute", "some/model"])
    assert out.returncode == 2 and "the following arguments are required" in out.stderr
    assert "Traceback" not in out.stderr


def test_keys_list_on_an_empty_store_says_so_and_where():
    out = _run(["keys", "list"])
    assert out.returncode == 0 and out.stderr == ""
    assert "no keys" in out.stdout and str(key_store_dir()) in out.stdout


def test_bad_source_gives_the_same_error_from_python(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        convert_permute(tmp_path / "missing", tmp_path / "out", tmp_path / "key")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        convert_approximate(tmp_path / "empty", tmp_path / "out")


def test_serve_start_up_failures_are_one_line(tiny, tmp_path):
    import socket

    _, folder, _ = tiny("gpt2", "client")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _one_line_error(_run(["serve", str(folder), "--port", str(port)]))
    assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line
    usage = _run(["serve", str(folder), "--port", "99999"])
    assert usage.returncode == 2 and "TCP port" in usage.stderr and "Traceback" not in usage.stderr
    plain = tmp_path / "plain"
    make_tiny("gpt2", plain)
    out = _run(["serve", str(plain)])
    assert "not converted" in _one_line_error(out) and "serving" not in out.stdout
