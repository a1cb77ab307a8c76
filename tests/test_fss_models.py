"""fss models end to end: unmodified tiny checkpoints against plaintext, generation with the
masked KV cache, and faults (keys for another program, reused, truncated; a party that dies)."""

import os
import signal
import time

import pytest
import torch

from hf_secure import SecureModel, SecureModelForCausalLM
from hf_secure.errors import (CorruptKeyError, KeyMismatchError, KeyReuseError, NotConvertedError, OutOfRangeError,
                              PartyFailedError)
from hf_secure.protocols.fss import nonlinear as nl
from hf_secure.protocols.fss.core import DEALER, FSS, KeySink, Masked, Params, Shares, key_id, new_seeds
from hf_secure.protocols.fss.keyfile import KeyReader, KeyWriter
from hf_secure.protocols.fss.local import run_model_local
from hf_secure.protocols.fss.models import program_for

from .conftest import make_tiny


def _decoder_public(past, new):
    return {"attention_mask": torch.ones(1, past + new, dtype=torch.long),
            "position_ids": torch.arange(past, past + new)[None], "cache": torch.tensor([1]),
            "past_length": torch.tensor([past]), "logits_to_keep": torch.tensor([1]),
            "drop": torch.tensor([], dtype=torch.long), "token_only": torch.tensor([0])}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sixteen_greedy_tokens_equal_plaintext(tmp_path, family):
    """16 new tokens with the masked KV cache equal the plaintext model's greedy tokens (every
    party in this process: the dealer's keys go through key files, openings through a link)."""
    def greedy(model, prompt):  # by hand: generate() would stop at the tiny model's end-of-text token
        tokens, margins, sequence = [], [], prompt
        with torch.no_grad():
            for _ in range(16):
                top = model(sequence).logits[0, -1].topk(2)
                tokens.append(int(top.indices[0]))
                margins.append(float(top.values[0] - top.values[1]))
                sequence = torch.cat([sequence, top.indices[:1].view(1, 1)], dim=1)
        return tokens, min(margins)

    # a (model, prompt) whose every greedy step wins by 4x the protocol's logit error on these
    # models (~0.0075): a closer tie may go either way under any fixed-point arithmetic
    def pick():
        for seed in range(6):
            model = make_tiny(family, tmp_path / f"{family}-{seed}", seed=seed)
            gen = torch.Generator().manual_seed(3)
            for _ in range(40):
                prompt = torch.randint(3, model.config.vocab_size, (1, 5), generator=gen)
                expected, margin = greedy(model, prompt)
                if margin > 0.03:
                    return model, prompt, expected
        raise AssertionError("no tiny model and prompt with clear greedy margins")

    model, prompt, expected = pick()
    weights = {k: v.float() for k, v in model.state_dict().items()}
    program, state, tokens, current, past = program_for(model.config, family), ({}, {}, {}), [], prompt, 0
    for _ in range(16):
        (logits,), _ = run_model_local(program, weights, current, _decoder_public(past, current.shape[1]),
                                       model.config.vocab_size, state=state)
        tokens.append(int(logits[0, -1].argmax()))
        past += current.shape[1]
        current = torch.tensor([[tokens[-1]]])
    assert tokens == expected


def _dealt(program, shape, path):
    """The dealer's key for ``program`` on an input of ``shape``, written to ``path``."""
    seeds = new_seeds()
    header = {"key_id": key_id(seeds), "party": 0, "seed": seeds[0].hex()}
    writers = [KeyWriter(path, header), KeyWriter(None, {**header, "party": 1})]
    dealer = FSS(DEALER, seeds, KeySink(writers))
    (x,) = dealer.reveal(Shares(dealer, torch.empty(shape, dtype=torch.int64, device="meta"), 50))
    program(dealer, x)
    for w in writers:
        w.close()
    return header


def _server_reads(program, shape, path, ledger=None):
    """Server 0 consuming the key at ``path`` for ``program`` on ``shape`` (no peer needed: the
    key is read before the first opening of the activation's comparison)."""
    reader = KeyReader(path, expect={"party": 0}, ledger=ledger)
    ctx = FSS(0, bytes.fromhex(reader.header["seed"]), reader, link=None)
    x = Masked(ctx, torch.zeros(shape, dtype=torch.int64), 50, torch.zeros(shape, dtype=torch.int64))
    return ctx, x


def _activation(ctx, x):
    return nl.activation(ctx, x, "gelu")


def test_key_for_another_sequence_length_is_refused(tmp_path):
    path = tmp_path / "key.bin"
    _dealt(_activation, (2, 8), path)
    ctx, x = _server_reads(_activation, (2, 9), path)
    with pytest.raises(KeyMismatchError, match="another model or sequence length"):
        _activation(ctx, x)


def test_truncated_and_reused_keys_are_refused(tmp_path):
    path = tmp_path / "key.bin"
    _dealt(_activation, (2, 8), path)
    data = path.read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    ctx, x = _server_reads(_activation, (2, 8), tmp_path / "cut.bin")
    with pytest.raises(CorruptKeyError, match="truncated"):
        _activation(ctx, x)
    ledger = tmp_path / "used-keys"
    KeyReader(path, ledger=ledger).close()
    with pytest.raises(KeyReuseError):
        KeyReader(path, ledger=ledger)


def test_plain_checkpoint_needs_protocol_fss(tmp_path):
    make_tiny("bert", tmp_path / "bert")
    with pytest.raises(NotConvertedError):
        SecureModel.from_pretrained(tmp_path / "bert")
    with pytest.raises(NotConvertedError):
        SecureModel.from_pretrained(tmp_path / "bert", protocol="mpc")


def test_session_queries_a_refused_query_then_a_server_dies(tmp_path):
    """Keys are per query (a second query gets fresh ones); a query beyond the norms' range is
    refused with OutOfRangeError and the session goes on; killing a server ends the next query
    with PartyFailedError within the timeout, not a hang."""
    from hf_secure.runtime import Role

    model = make_tiny("bert", tmp_path / "bert")
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[5] = 5000.0  # token 5 leaves the norm's input range
    model.save_pretrained(tmp_path / "bert")
    secure = SecureModel.from_pretrained(tmp_path / "bert", protocol="fss", key_dir=str(tmp_path / "keys"))
    ids = torch.randint(6, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(4))
    try:
        with torch.no_grad():
            expected = model(ids).last_hidden_state
        for _ in range(2):
            got = secure(ids).last_hidden_state
            assert (got - expected).abs().max() < 0.05
            report = secure.secure_report()
            assert report["SERVER0"]["key_bytes"] > 0 and report["bounds"]["truncation_failure"] == 0.0
        with pytest.raises(OutOfRangeError, match=r"norm input: \d+ values"):  # at least token 5's row
            secure(torch.cat([ids[:, :3], torch.tensor([[5]]), ids[:, 4:]], dim=1))
        assert (secure(ids).last_hidden_state - expected).abs().max() < 0.05  # the session goes on
        for server in ("server0", "server1"):  # one ledger entry per query
            assert (tmp_path / "keys" / server / "used-keys").read_text().count("\n") == 4
        assert not list((tmp_path / "keys").glob("*/key-*.bin"))  # used keys are deleted
        assert (tmp_path / "keys" / "server0").stat().st_mode & 0o777 == 0o700
        os.kill(secure.engine.session._group.procs[Role.SERVER1].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(PartyFailedError):
            secure(ids)
        assert time.monotonic() - start < 60
    finally:
        secure.engine.close()


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_cuda_path_is_bit_identical_on_the_same_keys(tmp_path, family):
    """The servers' CUDA path (table AES in torch ops, float64-limb matmuls) run on the CPU gives
    exactly the CPU path's outputs on the same keys: keys made once serve either path."""
    model = make_tiny(family, tmp_path / family)
    weights = {k: v.float() for k, v in model.state_dict().items()}
    ids = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    public = ({"attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
               "position_ids": torch.arange(6)[None]} if family == "bert" else _decoder_public(0, 6))
    runs, _ = run_model_local(program_for(model.config, family), weights, ids, public, model.config.vocab_size,
                              variants=[{}, {"backend": "table", "limb_products": True}])
    assert torch.equal(runs[0][0], runs[1][0])


def test_fss_parties_started_by_command_and_the_pipeline(tmp_path):
    """`hf-secure party --protocol fss`: owner (the plain demo GPT-2), servers and dealer (config and
    tokenizer only) meet a client that holds no weights; greedy tokens equal the plain model's.
    Then the same checkpoint through pipeline("secure-text-generation", protocol="fss")."""
    import shutil
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from hf_secure.cli import main
    from hf_secure.demo import DEMO_MODEL

    from .test_mpc_parties import ROLES, _free_port

    keys = tmp_path / "keys"
    assert main(["party-keys", "--out", str(keys)]) == 0
    user = tmp_path / "user"
    user.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL / name, user / name)
    tokenizer = AutoTokenizer.from_pretrained(user)  # the prompt's greedy margins are all >= 0.47: no near-tie
    ids = tokenizer("The weather today is", return_tensors="pt").input_ids
    plain = AutoModelForCausalLM.from_pretrained(DEMO_MODEL).eval()
    expected = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    rendezvous = f"tcp://127.0.0.1:{_free_port()}"
    procs = {role: subprocess.Popen([sys.executable, "-m", "hf_secure.cli", "party", "--protocol", "fss", "--role", role,
                                     "--model", str(DEMO_MODEL if role == "owner" else user), "--rendezvous", rendezvous,
                                     "--timeout", "120", "--party-key", str(keys / f"{role}.key")],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for role in ROLES}
    try:
        model = SecureModelForCausalLM.from_pretrained(user, protocol="fss", rendezvous=rendezvous,
                                                       party_key=str(keys / "client.key"))
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected)
        model.engine.close()
        for role, proc in procs.items():
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, (role, out)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    generator = pipeline("secure-text-generation", model=str(DEMO_MODEL), protocol="fss")
    try:
        text = generator("The weather today is", max_new_tokens=6, do_sample=False)[0]["generated_text"]
        assert text == tokenizer.decode(expected[0], skip_special_tokens=True)
    finally:
        generator.model.engine.close()
    with pytest.raises(NotConvertedError, match="protocol='fss'"):
        pipeline("secure-text-generation", model=str(DEMO_MODEL))


def test_unsupported_variants_and_options_are_refused(tmp_path):
    from hf_secure.errors import UnknownOptionError, UnsupportedModelError

    model = make_tiny("gpt2", tmp_path / "gpt2")
    for field in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        config = model.config.__class__(**{**model.config.to_dict(), field: True})
        with pytest.raises(UnsupportedModelError):
            program_for(config, "gpt2")
    with pytest.raises(UnsupportedModelError):
        program_for(model.config.__class__(**{**model.config.to_dict(), "scale_attn_weights": False}), "gpt2")
    for options in ({"device": "gpu"}, {"reveal": "token"}, {"rendezvous": "tcp://127.0.0.1:1", "key_dir": "x"},
                    {"key_dir": str(tmp_path / "gpt2" / "config.json")}):
        with pytest.raises(UnknownOptionError):
            SecureModelForCausalLM.from_pretrained(tmp_path / "gpt2", protocol="fss", **options)
