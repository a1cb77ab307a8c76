"""The permute protocol over HTTP: a real ``hf-secure serve`` process on loopback."""

from __future__ import annotations

import time

import httpx
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from hf_secure.errors import KeyMismatchError, ServerError
from hf_secure.modeling import SecureModel, SecureModelForCausalLM
from hf_secure.server import wire
from hf_secure.server.process import served

from .conftest import TOL, VOCAB


@pytest.fixture(scope="module")
def llama_server(tiny):
    _, folder, _ = tiny("llama", "server")
    with served(str(folder)) as (_, url):
        yield url


@pytest.fixture(scope="module")
def bert_server(tiny):
    _, folder, _ = tiny("bert", "client")
    with served(str(folder)) as (_, url):
        yield url


def _check_generation(plain, folder, key, url):
    secure = SecureModelForCausalLM.from_pretrained(folder, key=key, server_url=url, timeout=30)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (secure(ids, use_cache=False).logits - plain(ids).logits).abs().max().item() < TOL
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert torch.equal(secure.generate(ids, **kwargs), plain.generate(ids, **kwargs))
    stats = secure.engine.stats.snapshot()
    assert stats["rounds"] == 1 + 32 and stats["bytes_sent"] > 0


def test_gpt2_generation_over_http(tiny, live_server):
    plain, folder, key = tiny("gpt2", "client")
    _check_generation(plain, folder, key, live_server[1])


def test_llama_generation_over_http(tiny, llama_server):
    plain, folder, key = tiny("llama", "server")
    _check_generation(plain, folder, key, llama_server)


def test_bert_hidden_states_over_http(tiny, bert_server):
    plain, folder, key = tiny("bert", "client")
    secure = SecureModel.from_pretrained(folder, key=key, server_url=bert_server)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    with torch.no_grad():
        got, expected = secure(ids, token_type_ids=types), plain(ids, token_type_ids=types)
    assert (got.last_hidden_state - expected.last_hidden_state).abs().max().item() < TOL


def test_server_of_another_model_is_refused(tiny, llama_server):
    _, folder, key = tiny("gpt2", "client")
    with pytest.raises(KeyMismatchError, match="different model"):
        SecureModelForCausalLM.from_pretrained(folder, key=key, server_url=llama_server)


@pytest.mark.parametrize(
    "params, body, status, message",
    [
        ({}, b"not safetensors at all", 400, "header"),
        ({}, (5).to_bytes(8, "little") + b"{nope", 400, "malformed"),
        ({}, b"", 400, "too short"),
        ({}, wire.encode({"input_ids": torch.tensor([[1, 2]])}), 400, "inputs_embeds"),
        ({}, wire.encode({"inputs_embeds": torch.zeros(1, 2, 64), "pixels": torch.zeros(1)}), 400, "unknown inputs"),
        ({}, wire.encode({"inputs_embeds": torch.zeros(1, 2, 63)}), 400, "inputs_embeds"),
        ({}, wire.encode({"inputs_embeds": torch.full((1, 2, 64), float("nan"))}), 400, "NaN"),
        ({"output": "logits"}, wire.encode({"inputs_embeds": torch.zeros(1, 2, 64)}), 400, "not available"),
        ({"output": "secrets"}, wire.encode({"inputs_embeds": torch.zeros(1, 2, 64)}), 400, "output"),
        ({"session_id": "f" * 32}, wire.encode({"inputs_embeds": torch.zeros(1, 2, 64)}), 404, "session"),
        ({"past_length": 5}, wire.encode({"inputs_embeds": torch.zeros(1, 2, 64)}), 400, "past_length"),
        ({}, wire.encode({"inputs_embeds": torch.zeros(1, 2, 64), "attention_mask": torch.ones(1, 3)}), 400,
         "attention_mask"),
        ({}, wire.encode({"inputs_embeds": torch.zeros(1, 500, 64)}), 400, "positions"),
    ],
)
def test_malformed_requests_get_clear_errors(live_server, params, body, status, message):
    response = httpx.post(live_server[1] + "/v1/forward", params=params, content=body, timeout=30)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_session_continuation_checks_length(live_server):
    url = live_server[1]
    sid = httpx.post(url + "/v1/sessions", timeout=30).json()["session_id"]
    body = wire.encode({"inputs_embeds": torch.zeros(1, 3, 64)})
    ok = httpx.post(url + "/v1/forward", params={"session_id": sid}, content=body, timeout=30)
    assert ok.status_code == 200 and wire.decode(ok.content)[1]["length"] == "3"
    ahead = httpx.post(url + "/v1/forward", params={"session_id": sid, "past_length": 7}, content=body, timeout=30)
    assert ahead.status_code == 400 and "holds 3 tokens" in ahead.json()["error"]
    assert httpx.delete(url + f"/v1/sessions/{sid}", timeout=30).json() == {"closed": True}


class _KillServerAfter(LogitsProcessor):
    def __init__(self, proc, steps):
        self.proc, self.steps, self.calls = proc, steps, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.steps:
            self.proc.kill()
            self.proc.wait()
        return scores


def test_server_dies_mid_generation(tiny):
    _, folder, key = tiny("gpt2", "client")
    with served(str(folder)) as (proc, url):
        secure = SecureModelForCausalLM.from_pretrained(folder, key=key, server_url=url, timeout=5)
        killer = _KillServerAfter(proc, steps=3)
        start = time.monotonic()
        with pytest.raises(ServerError, match="unreachable"):
            secure.generate(torch.arange(3, 10)[None], max_new_tokens=32, do_sample=False,
                            logits_processor=LogitsProcessorList([killer]))
        assert time.monotonic() - start < 20
        assert killer.calls == 3
