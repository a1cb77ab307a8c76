"""`hf-secure party`: the owner, both servers and the dealer as separate commands meeting at a rendezvous."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_secure import SecureModelForCausalLM
from hf_secure.cli import main
from hf_secure.convert import convert_approximate, convert_permute
from hf_secure.hub import weight_files
from hf_secure.demo import DEMO_MODEL

ROLES = ("server0", "server1", "dealer", "owner")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _party(role: str, folder, rendezvous: str, keys) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hf_secure.cli", "party", "--role", role, "--model", str(folder),
                             "--rendezvous", rendezvous, "--timeout", "60", "--party-key", str(keys / f"{role}.key")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def party_keys(tmp_path_factory):
    """One key file per role, as `hf-secure party-keys` writes them for a session on several machines."""
    folder = tmp_path_factory.mktemp("party-keys")
    assert main(["party-keys", "--out", str(folder)]) == 0
    return folder


def test_parties_started_by_command_serve_a_client_that_holds_no_weights(tmp_path, party_keys):
    convert_approximate(str(DEMO_MODEL), tmp_path / "approx")
    user = tmp_path / "user"  # what the user, the servers and the dealer have: config, tokenizer; no weights
    assert main(["public", str(tmp_path / "approx"), "--out", str(user)]) == 0
    assert not weight_files(user) and (user / "tokenizer.json").is_file() and "no weights" in (user / "README.md").read_text()
    tokenizer = AutoTokenizer.from_pretrained(user)
    ids = tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "approx").generate(ids, max_new_tokens=8, do_sample=False)

    rendezvous = f"tcp://127.0.0.1:{_free_port()}"
    procs = {role: _party(role, tmp_path / "approx" if role == "owner" else user, rendezvous, party_keys)
             for role in ROLES}
    try:
        model = SecureModelForCausalLM.from_pretrained(user, protocol="mpc", rendezvous=rendezvous,
                                                       party_key=str(party_keys / "client.key"))
        got = model.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(got, expected)
        assert model.secure_report()["DEALER"]["offline_bytes"] > 0
        model.engine.close()  # the client ends the session: every party exits cleanly
        for role, proc in procs.items():
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, (role, out)
            assert "session over" in out
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


def test_party_refuses_checkpoints_that_are_not_for_mpc(tmp_path, party_keys, monkeypatch):
    monkeypatch.setenv("HF_SECURE_PARTY_KEY", str(party_keys / "server0.key"))
    convert_permute(str(DEMO_MODEL), tmp_path / "permuted", tmp_path / "key.safetensors")
    for folder, message in ((tmp_path / "permuted", "convert approximate"), (DEMO_MODEL, "not converted")):
        out = subprocess.run([sys.executable, "-m", "hf_secure.cli", "party", "--role", "server0", "--model",
                              str(folder), "--rendezvous", "tcp://127.0.0.1:1"], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 1 and message in out.stderr


@pytest.mark.parametrize("role", ["server0", "server1", "dealer"])
def test_servers_and_dealer_refuse_a_folder_with_weights(tmp_path, capsys, role, party_keys, monkeypatch):
    monkeypatch.setenv("HF_SECURE_PARTY_KEY", str(party_keys / f"{role}.key"))
    """Issue 10: a server given the owner's folder would hold the plaintext weights."""
    folder = tmp_path / "approx"
    if not folder.is_dir():
        convert_approximate(str(DEMO_MODEL), folder)
    assert main(["party", "--role", role, "--model", str(folder), "--rendezvous", "tcp://127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert "holds the model's weights" in err and "hf-secure public" in err


def test_push_refuses_an_mpc_checkpoint_with_weights(tmp_path):
    from hf_secure.errors import KeyMaterialUploadError
    from hf_secure.hub import check_uploadable

    convert_approximate(str(DEMO_MODEL), tmp_path / "approx")
    with pytest.raises(KeyMaterialUploadError, match="owner's secret"):
        check_uploadable(tmp_path / "approx")
    assert main(["public", str(tmp_path / "approx"), "--out", str(tmp_path / "public")]) == 0
    names = sorted(p.name for p in check_uploadable(tmp_path / "public"))
    assert "config.json" in names and "README.md" in names and not any(n.endswith(".safetensors") for n in names)


def test_party_without_its_key_file_is_refused(party_keys, capsys):
    argv = ["party", "--role", "server0", "--model", str(DEMO_MODEL), "--rendezvous", "tcp://10.0.0.1:1"]
    assert main(argv) == 1
    assert "HF_SECURE_PARTY_KEY" in capsys.readouterr().err
    assert main([*argv, "--party-key", str(party_keys / "server1.key")]) == 1  # another role's file
    assert "role 'server1'" in capsys.readouterr().err


def test_weights_are_found_under_any_name_depth_or_link(tmp_path):
    (tmp_path / "deep" / "er").mkdir(parents=True)
    for name in ("model.SAFETENSORS", "model.safetensors.bak", "deep/er/pytorch_model.bin"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "linked").symlink_to(tmp_path / "deep")
    found = weight_files(tmp_path)
    assert {"model.SAFETENSORS", "model.safetensors.bak", "deep/er/pytorch_model.bin",
            "linked/er/pytorch_model.bin"} <= set(found)


@pytest.mark.parametrize("argv", [["--role", "client"], ["--role", "server0"]])
def test_party_command_line_errors(argv):
    out = subprocess.run([sys.executable, "-m", "hf_secure.cli", "party", *argv], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2


@pytest.fixture(scope="module")
def demo_approx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "approx"
    convert_approximate(str(DEMO_MODEL), folder)
    return folder


SCRIPT = """
from transformers import pipeline
import hf_secure
generator = pipeline("secure-text-generation", model={folder!r}, protocol="mpc")
print("OUT", generator("It is a truth", max_new_tokens=3, do_sample=False)[0]["generated_text"])
"""


@pytest.mark.parametrize("how", ["script", "-c"])
def test_mpc_pipeline_runs_from_a_script_without_a_main_guard(demo_approx, tmp_path, how):
    """The local parties are processes of the package: the user's script is never re-imported by them."""
    code = SCRIPT.format(folder=str(demo_approx))
    (tmp_path / "user_script.py").write_text(code)
    argv = [str(tmp_path / "user_script.py")] if how == "script" else ["-c", code]
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("OUT It is a truth") == 1, out.stdout


def test_mpc_batched_left_padded_generation_equals_plaintext(demo_approx):
    tokenizer = AutoTokenizer.from_pretrained(demo_approx)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(["It is a truth universally acknowledged", "Emma"], return_tensors="pt", padding=True)
    assert batch.attention_mask[1, 0] == 0  # the second row is left-padded
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = AutoModelForCausalLM.from_pretrained(demo_approx).generate(**batch, **kwargs)
    model = SecureModelForCausalLM.from_pretrained(demo_approx, protocol="mpc")
    try:
        got = model.generate(**batch, **kwargs)
        for row in range(2):
            assert torch.equal(got[row], expected[row]), row
    finally:
        model.engine.close()


def test_public_part_errors_are_one_line(tmp_path, capsys):
    convert_permute(str(DEMO_MODEL), tmp_path / "permuted", tmp_path / "key.safetensors")
    (tmp_path / "file").write_text("x")
    for folder, out, message in ((tmp_path / "none", tmp_path / "o1", "does not exist"),
                                 (tmp_path / "permuted", tmp_path / "o2", "not an mpc checkpoint"),
                                 (tmp_path / "permuted", tmp_path / "permuted", "new or empty folder"),
                                 (tmp_path / "permuted", tmp_path / "file", "new or empty folder")):
        assert main(["public", str(folder), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert message in err and "unexpected" not in err
