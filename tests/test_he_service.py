"""The he protocol with its server in another process (``hf-secure serve DIR --protocol he``), and
the server's handling of clients that misbehave or go away."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hf_secure import SecureModel
from hf_secure.errors import InvalidRequestError, ServerError, UnknownSessionError
from hf_secure.protocols.he import client as he_client
from hf_secure.protocols.he.backend import CKKS
from hf_secure.protocols.he.bert import BertProgram
from hf_secure.protocols.he.layers import layouts
from hf_secure.protocols.he.client import MODEL_PARAMS
from hf_secure.protocols.he.refresh import answer_refresh
from hf_secure.protocols.he.service import HEService
from hf_secure.server.process import served

from .conftest import make_he_bert

TOL = 1e-3  # CKKS at 2^40 with the approximations' stated errors (the in-process test's tolerance)


@pytest.fixture(scope="module")
def he_bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("he-served")
    model, tokenizer = make_he_bert(folder)
    return model, folder, tokenizer


def test_query_through_a_separate_server(he_bert, tmp_path):
    model, folder, tokenizer = he_bert
    enc = tokenizer(["private inference with ciphertexts"], return_tensors="pt")
    with served(str(folder), args=("--protocol", "he")) as (_, url):
        info = httpx.get(url + "/v1/info").json()
        assert info["protocol"] == "he" and info["family"] == "bert"
        forward = httpx.post(url + "/v1/forward", content=b"")
        assert forward.status_code == 400
        # the client holds the config, the tokenizer and the embedding tables only
        client_dir = tmp_path / "client"
        model.config.save_pretrained(client_dir)
        tokenizer.save_pretrained(client_dir)
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("embeddings.")},
                  client_dir / "model.safetensors")
        secure = SecureModel.from_pretrained(client_dir, protocol="he", server_url=url, timeout=60)
        got = secure(**enc).last_hidden_state
        with torch.no_grad():
            want = model(**enc).last_hidden_state
        assert (got - want).abs().max() < TOL
        stats = secure.engine.stats
        assert stats.rounds > 1 and stats.bytes_sent > 0 and stats.bytes_received > 0
        # a client whose embeddings differ from the server's model is refused before any query
        other = tmp_path / "other"
        make_he_bert(other, seed=4)
        with pytest.raises(ServerError, match="another model"):
            SecureModel.from_pretrained(other, protocol="he", server_url=url, timeout=60)
        secure.engine.close()


def test_server_dies_mid_query(he_bert, monkeypatch):
    _, folder, tokenizer = he_bert
    enc = tokenizer(["the server goes away"], return_tensors="pt")
    with served(str(folder), args=("--protocol", "he")) as (proc, url):
        secure = SecureModel.from_pretrained(folder, protocol="he", server_url=url, timeout=10)

        def kill_then_answer(ctx, request):
            proc.kill()
            proc.wait()
            return answer_refresh(ctx, request)

        monkeypatch.setattr(he_client, "answer_refresh", kill_then_answer)
        start = time.monotonic()
        with pytest.raises(ServerError, match="unreachable"):
            secure(**enc)
        assert time.monotonic() - start < 60
        secure.engine.close()  # the server is gone: closing does not hang or raise


def test_service_refuses_bad_clients_and_survives_them(he_bert):
    _, folder, tokenizer = he_bert
    service = HEService(str(folder), max_sessions=1, answer_timeout_s=1.0)
    client = CKKS.keygen(MODEL_PARAMS)
    config = service.config
    block = 8
    blob = client.evaluation_keys(steps=sorted(BertProgram.steps_needed(client, config, block)))
    sid = service.open_session("alice")
    with pytest.raises(InvalidRequestError, match="quota"):
        service.open_session("alice")
    with pytest.raises(UnknownSessionError):
        service.put_keys(sid, "bob", blob[:10], 0, len(blob))  # another caller's session reads as unknown
    lay, _ = layouts(MODEL_PARAMS.slots, config, block)
    x = np.random.default_rng(0).normal(size=(lay.tokens, lay.width))
    inputs = [client.encrypt_plaintext(client.encode(v, MODEL_PARAMS.levels, MODEL_PARAMS.scale)) for v in lay.pack(x)]
    valid = np.zeros(lay.tokens)
    valid[:5] = 1
    with pytest.raises(InvalidRequestError, match="no evaluation keys"):
        service.start(sid, "alice", block, inputs, valid)
    with pytest.raises(InvalidRequestError, match="key chunk"):
        service.put_keys(sid, "alice", blob[:10], 10, len(blob))  # out of order
    tampered = bytearray(blob)
    tampered[len(blob) // 2] ^= 1
    with pytest.raises(InvalidRequestError, match="refused"):
        service.put_keys(sid, "alice", bytes(tampered), 0, len(blob))
    assert service.put_keys(sid, "alice", blob, 0, len(blob))["loaded"]
    with pytest.raises(InvalidRequestError, match="ciphertexts"):
        service.start(sid, "alice", block, inputs[:-1], valid)
    bad = bytearray(inputs[0])
    bad[-7] ^= 1
    with pytest.raises(InvalidRequestError, match="CorruptKeyError"):  # a tampered ciphertext: the query fails
        kind, _ = service.start(sid, "alice", block, [bytes(bad)] + inputs[1:], valid)
        while kind == "pending":
            kind, _ = service.poll(sid, "alice")
    # a client that stops answering: the query ends after the answer timeout, the session lives on
    kind, _ = service.start(sid, "alice", block, inputs, valid)
    while kind == "pending":
        kind, _ = service.poll(sid, "alice")
    assert kind == "refresh"
    assert service.poll(sid, "alice")[0] == "refresh"  # the current event again: a lost answer is had again
    with pytest.raises(InvalidRequestError, match="still running"):  # one query at a time
        service.start(sid, "alice", block, inputs, valid)
    with pytest.raises(InvalidRequestError, match="running"):
        service.put_keys(sid, "alice", blob, 0, len(blob))
    time.sleep(1.5)
    with pytest.raises(InvalidRequestError, match="no refresh answer"):
        service.poll(sid, "alice")
    with pytest.raises(InvalidRequestError, match="waiting for an answer"):
        service.answer(sid, "alice", b"late")
    # a cancelled query (the client's call on any error) leaves the session usable
    service.start(sid, "alice", block, inputs, valid)
    service.cancel(sid, "alice")
    deadline = time.monotonic() + 120
    with pytest.raises(InvalidRequestError, match="cancelled"):
        while time.monotonic() < deadline:  # the worker stops at its next refresh
            service.poll(sid, "alice", wait_s=0.5)
    kind, request = service.start(sid, "alice", block, inputs, valid)
    assert kind in ("refresh", "pending")
    if kind == "refresh":
        kind, _ = service.answer(sid, "alice", answer_refresh(client, request))
    service.close_session(sid, "alice")  # cancels the running query
    with pytest.raises(UnknownSessionError):
        service.poll(sid, "alice")
    assert service.close_all() == 0
    sid = service.open_session("alice")  # the quota counts open sessions only
    service.put_keys(sid, "alice", blob[:10], 0, len(blob))
    with pytest.raises(InvalidRequestError, match="key chunk"):  # the total is fixed by the first chunk
        service.put_keys(sid, "alice", blob[10:20], 10, len(blob) + 1)
