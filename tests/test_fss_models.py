"""fss models end to end: unmodified tiny checkpoints against plaintext, generation with the
masked KV cache, and faults (keys for another program, reused, truncated; a party that dies)."""

import os
import signal
import time

import pytest
import torch

from hf_secure import SecureModel, SecureModelForCausalLM
from hf_secure.errors import CorruptKeyError, KeyMismatchError, KeyReuseError, NotConvertedError, PartyFailedError
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
    model = make_tiny(family, tmp_path / family)
    weights = {k: v.float() for k, v in model.state_dict().items()}
    prompt = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                  do_sample=False)[0, 5:].tolist()
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


def test_session_two_queries_then_a_server_dies(tmp_path):
    """Keys are per query (a second query gets fresh ones); killing a server ends the next query
    with PartyFailedError within the timeout, not a hang."""
    from hf_secure.runtime import Role

    model = make_tiny("bert", tmp_path / "bert")
    secure = SecureModel.from_pretrained(tmp_path / "bert", protocol="fss", key_dir=str(tmp_path / "keys"))
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(4))
    try:
        with torch.no_grad():
            expected = model(ids).last_hidden_state
        for _ in range(2):
            got = secure(ids).last_hidden_state
            assert (got - expected).abs().max() < 0.05
            report = secure.secure_report()
            assert report["SERVER0"]["key_bytes"] > 0 and report["bounds"]["truncation_failure"] == 0.0
        for server in ("server0", "server1"):  # one ledger entry per query
            assert (tmp_path / "keys" / server / "used-keys").read_text().count("\n") == 2
        assert not list((tmp_path / "keys").glob("*/key-*.bin"))  # used keys are deleted
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
