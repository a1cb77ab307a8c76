"""The hf-secure command line: convert, keys, generate."""

from __future__ import annotations

import json
import shutil
import subprocess

from transformers import AutoTokenizer

from hf_secure.cli import main
from hf_secure.keys import KeyStore

from .conftest import make_tiny, minilm_folder


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
