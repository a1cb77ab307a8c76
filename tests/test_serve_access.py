"""``hf-secure serve`` in a deployment: tokens, per-token sessions and quotas, limits before reading,
TLS, graceful shutdown. Outputs are compared with the plaintext model (tolerance TOL)."""

from __future__ import annotations

import datetime
import ipaddress
import signal
import socket
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer, pipeline

from hf_secure.cli import main
from hf_secure.errors import ServerError, UnknownOptionError
from hf_secure.modeling import SecureModelForCausalLM
from hf_secure.server import wire
from hf_secure.server.access import AccessPolicy
from hf_secure.server.app import ServeLimits, create_app
from hf_secure.server.limits import CallerSlots
from hf_secure.server.process import free_port, served
from hf_secure.server.runtime import ModelServer

from .conftest import TOL, VOCAB, minilm_folder

ALICE, BOB = "alice-" + "a" * 26, "bob-" + "b" * 28
TOKENS = f"# issued 2026-11-29\nalice:{ALICE}\nbob:{BOB}  # the second user\n"


def bearer(token):
    return {"authorization": f"Bearer {token}"}


def embeds(seq: int, batch: int = 1) -> bytes:
    return wire.encode({"inputs_embeds": torch.randn(batch, seq, 64)})


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    path.write_text(TOKENS)
    path.chmod(0o600)
    return path


# -- the token list ---------------------------------------------------------------------------------------------------

def test_token_file_and_environment(token_file):
    policy = AccessPolicy.load(token_file, environ={"HF_SECURE_SERVER_TOKENS": "carol:" + "c" * 20 + ", " + "d" * 20})
    names = [name for name, _ in policy.callers]
    assert names[:3] == ["alice", "bob", "carol"] and names[3].startswith("token-")
    assert policy.identify(ALICE) == "alice" and policy.identify(BOB) == "bob"
    assert policy.identify(ALICE[:-1]) is None and policy.identify(None) is None and policy.identify("") is None
    assert AccessPolicy.load(None, environ={}).identify(None) == "anonymous"


@pytest.mark.parametrize("entries, message", [
    (["short"], "at least 16"),
    (["has space" + "x" * 16], "at least 16"),
    (["alice:" + "x" * 20, "alice:" + "y" * 20], "already listed"),
    (["a:" + "x" * 20, "b:" + "x" * 20], "already listed"),
    (["anonymous:" + "x" * 20], "anonymous"),
    (["bad name:" + "x" * 20], "name"),
])
def test_bad_token_entries_are_refused_without_echoing_them(entries, message):
    with pytest.raises(UnknownOptionError, match=message) as info:
        AccessPolicy.from_entries(entries)
    assert "x" * 16 not in str(info.value)


def test_token_sources_are_checked(tmp_path, token_file):
    with pytest.raises(UnknownOptionError, match="not a file"):
        AccessPolicy.load(tmp_path / "none.txt", environ={})
    with pytest.raises(UnknownOptionError, match="lists no token"):
        AccessPolicy.load(None, environ={"HF_SECURE_SERVER_TOKENS": " , "})
    (tmp_path / "bom.txt").write_text("\ufeff" + TOKENS)
    (tmp_path / "bom.txt").chmod(0o600)
    assert [n for n, _ in AccessPolicy.load(tmp_path / "bom.txt", environ={}).callers] == ["alice", "bob"]
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9:" + b"x" * 20)
    (tmp_path / "latin1.txt").chmod(0o600)
    with pytest.raises(UnknownOptionError, match="not UTF-8"):
        AccessPolicy.load(tmp_path / "latin1.txt", environ={})
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    with pytest.raises(UnknownOptionError, match="chmod 600"):
        AccessPolicy.load(tmp_path / "empty.txt", environ={})
    (tmp_path / "empty.txt").chmod(0o600)
    with pytest.raises(UnknownOptionError, match="lists no token"):
        AccessPolicy.load(tmp_path / "empty.txt", environ={})
    with pytest.raises(UnknownOptionError, match="both"):
        AccessPolicy.load(token_file, environ={"HF_SECURE_SERVER_TOKENS": f"eve:{ALICE}"})


def test_caller_slots():
    slots = CallerSlots(2)
    slots.acquire("a"), slots.acquire("a"), slots.acquire("b")
    with pytest.raises(Exception, match="2 requests in flight"):
        slots.acquire("a")
    slots.release("a")
    slots.acquire("a")


# -- sessions belong to their token, quotas (in-process app) -----------------------------------------------------------

@pytest.fixture
def app_for(tiny, token_file):
    def build(**server_kwargs):
        server = ModelServer(str(tiny("gpt2", "client")[1]), **server_kwargs)
        return server, TestClient(create_app(server, AccessPolicy.load(token_file, environ={})))
    return build


def test_missing_or_wrong_token_is_401(app_for):
    _, client = app_for()
    assert client.get("/healthz").json() == {"status": "ok"}
    for headers in ({}, bearer("x" * 32), {"authorization": f"Basic {ALICE}"}, bearer(ALICE + "x")):
        for method, path in (("GET", "/v1/info"), ("POST", "/v1/sessions"), ("POST", "/v1/forward"),
                             ("DELETE", "/v1/sessions/abc")):
            response = client.request(method, path, headers=headers, content=embeds(2) if "forward" in path else None)
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer" and "server_token" in response.json()["error"]
    assert client.get("/v1/info", headers=bearer(ALICE)).status_code == 200


def test_another_tokens_session_reads_as_unknown(app_for):
    server, client = app_for()
    sid = client.post("/v1/sessions", headers=bearer(ALICE)).json()["session_id"]
    ok = client.post("/v1/forward", params={"session_id": sid}, content=embeds(3), headers=bearer(ALICE))
    assert ok.status_code == 200
    stolen = client.post("/v1/forward", params={"session_id": sid, "past_length": 3}, content=embeds(1),
                         headers=bearer(BOB))
    unknown = client.post("/v1/forward", params={"session_id": "0" * 32, "past_length": 3}, content=embeds(1),
                          headers=bearer(BOB))
    assert stolen.status_code == unknown.status_code == 404
    assert stolen.json()["error"].replace(sid, "ID") == unknown.json()["error"].replace("0" * 32, "ID")
    assert client.delete(f"/v1/sessions/{sid}", headers=bearer(BOB)).status_code == 404
    assert server.session_stats()["alice"]["sessions"] == 1  # bob's attempts changed nothing
    again = client.post("/v1/forward", params={"session_id": sid, "past_length": 3}, content=embeds(1),
                        headers=bearer(ALICE))
    assert again.status_code == 200 and wire.decode(again.content)[1]["length"] == "4"
    assert client.delete(f"/v1/sessions/{sid}", headers=bearer(ALICE)).json() == {"closed": True}
    assert client.delete(f"/v1/sessions/{sid}", headers=bearer(ALICE)).status_code == 404


def test_session_quota_is_per_token_and_evicts_nobody(app_for):
    server, client = app_for(max_sessions=3)
    mine = [client.post("/v1/sessions", headers=bearer(BOB)).json()["session_id"] for _ in range(3)]
    refused = client.post("/v1/sessions", headers=bearer(BOB))
    assert refused.status_code == 429 and "quota" in refused.json()["error"] and "retry-after" not in refused.headers
    assert client.post("/v1/sessions", headers=bearer(ALICE)).status_code == 200  # alice has her own quota
    assert server.session_stats()["bob"]["sessions"] == 3
    client.delete(f"/v1/sessions/{mine[0]}", headers=bearer(BOB))
    assert client.post("/v1/sessions", headers=bearer(BOB)).status_code == 200


def test_cache_quota_counts_bytes(app_for):
    server, client = app_for(max_cache_bytes=1)  # measured below; replaced before use
    per_token = server.kv_bytes_per_token
    assert per_token == 2 * 2 * 64 * 4  # 2 layers x (keys + values) x 64 channels x fp32
    server.max_cache_bytes = 20 * per_token
    one = client.post("/v1/sessions", headers=bearer(ALICE)).json()["session_id"]
    two = client.post("/v1/sessions", headers=bearer(ALICE)).json()["session_id"]
    assert client.post("/v1/forward", params={"session_id": one}, content=embeds(6, batch=2),
                       headers=bearer(ALICE)).status_code == 200  # 12 token-rows
    over = client.post("/v1/forward", params={"session_id": two}, content=embeds(9), headers=bearer(ALICE))
    assert over.status_code == 429 and "MiB of KV cache" in over.json()["error"]
    assert client.post("/v1/forward", params={"session_id": two}, content=embeds(8),
                       headers=bearer(ALICE)).status_code == 200  # 12 + 8 = 20 fits exactly
    assert server.session_stats()["alice"]["cache_bytes"] == 20 * per_token
    bob = client.post("/v1/sessions", headers=bearer(BOB)).json()["session_id"]
    assert client.post("/v1/forward", params={"session_id": bob}, content=embeds(20),
                       headers=bearer(BOB)).status_code == 200  # bob's bytes are his own


def test_idle_sessions_expire(app_for):
    _, client = app_for(session_ttl_s=0.2)
    sid = client.post("/v1/sessions", headers=bearer(ALICE)).json()["session_id"]
    time.sleep(0.4)
    late = client.post("/v1/forward", params={"session_id": sid}, content=embeds(2), headers=bearer(ALICE))
    assert late.status_code == 404 and "expired" in late.json()["error"]


# -- a real server process: limits before reading, the client's token ---------------------------------------------------

@pytest.fixture(scope="module")
def guarded(tiny, token_file):
    _, folder, _ = tiny("gpt2", "client")
    with served(str(folder), args=("--token-file", str(token_file), "--max-body-mb", "1")) as (proc, url):
        yield proc, url


def _raw_request(url: str, head: str, body: bytes = b"") -> str:
    """Send raw HTTP; return the status line and body the server answered."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and b'"}' in answer:
                break
    return answer.decode(errors="replace")


def test_oversized_content_length_is_refused_unread(guarded):
    # announces 1 GB and sends none of it: the answer comes at once, nothing is waited for or read
    start = time.monotonic()
    answer = _raw_request(guarded[1], f"POST /v1/forward HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n"
                                      "Content-Type: application/octet-stream\r\nContent-Length: 1000000000\r\n\r\n")
    assert answer.startswith("HTTP/1.1 413") and "exceeds this server's limit of 1048576 bytes" in answer
    assert time.monotonic() - start < 5


def test_oversized_streamed_body_is_cut_off(guarded):
    sent = []

    def chunks():
        for _ in range(64):  # 4 MiB in 64 KiB chunks, no Content-Length
            sent.append(1)
            yield b"\0" * 65536

    response = httpx.post(guarded[1] + "/v1/forward", content=chunks(), headers=bearer(ALICE), timeout=30)
    assert response.status_code == 413 and "limit of 1048576 bytes" in response.json()["error"]


def test_stranger_uploads_nothing(guarded):
    answer = _raw_request(guarded[1], "POST /v1/forward HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n\r\n")
    assert answer.startswith("HTTP/1.1 401")


def test_client_token_from_argument_and_environment(tiny, guarded, monkeypatch):
    plain, folder, key = tiny("gpt2", "client")
    with pytest.raises(ServerError, match="401.*server_token"):
        SecureModelForCausalLM.from_pretrained(folder, key=key, server_url=guarded[1])
    with pytest.raises(ServerError, match="401"):
        SecureModelForCausalLM.from_pretrained(folder, key=key, server_url=guarded[1], server_token=BOB[:-1] + "x")
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=12, do_sample=False)
    expected = plain.generate(ids, **kwargs)
    secure = SecureModelForCausalLM.from_pretrained(folder, key=key, server_url=guarded[1],
                                                    server_token=ALICE + "\n")  # as read from a file
    assert torch.equal(secure.generate(ids, **kwargs), expected)
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())  # any tokenizer: pipeline() needs one
    generator = pipeline("secure-text-generation", model=str(folder), key=str(key), tokenizer=tokenizer,
                         server_url=guarded[1], server_token=ALICE)
    assert torch.equal(generator.model.generate(ids, **kwargs), expected)
    monkeypatch.setenv("HF_SECURE_TOKEN", BOB)
    secure = SecureModelForCausalLM.from_pretrained(folder, key=key, server_url=guarded[1])
    with torch.no_grad():
        assert (secure(ids, use_cache=False).logits - plain(ids).logits).abs().max().item() < TOL


def test_token_is_never_sent_in_clear_to_another_machine(tiny):
    _, folder, key = tiny("gpt2", "client")
    for bad in ("", "short", ALICE[:20] + " " + ALICE[20:], ALICE + "\u00e9"):
        with pytest.raises(UnknownOptionError, match="is not a token") as info:
            SecureModelForCausalLM.from_pretrained(folder, key=key, server_url="http://127.0.0.1:1", server_token=bad)
        assert ALICE[:16] not in str(info.value)
    with pytest.raises(UnknownOptionError, match="in clear"):
        SecureModelForCausalLM.from_pretrained(folder, key=key, server_url="http://192.0.2.1:8000", server_token=ALICE)
    with pytest.raises(UnknownOptionError, match="need a server_url"):
        SecureModelForCausalLM.from_pretrained(folder, key=key, server_token=ALICE)


# -- serve refuses unsafe configurations before loading ----------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--host", "0.0.0.0"], "no token is configured"),
    (["--host", "0.0.0.0", "--token-file", "TOKENS"], "in clear"),
    (["--no-auth", "--token-file", "TOKENS"], "contradicts"),
    (["--ssl-certfile", "TOKENS"], "both --ssl-certfile and --ssl-keyfile"),
    (["--ssl-certfile", "TOKENS", "--ssl-keyfile", "TOKENS"], "cannot load the TLS certificate"),
    (["--host", "no-such-host.invalid"], "no such address"),
    (["--max-body-mb", "99999999999999999999"], "largest body"),
])
def test_serve_refuses_unsafe_configuration(tiny, token_file, capsys, args, message):
    _, folder, _ = tiny("gpt2", "client")
    args = [str(token_file) if a == "TOKENS" else a for a in args]
    assert main(["serve", str(folder), "--port", str(free_port()), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and ALICE not in err


# -- TLS ----------------------------------------------------------------------------------------------------------------

def _self_signed(folder, name: str):
    """A self-signed certificate for 127.0.0.1 and its key, written as PEM; returns (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_with_and_without_the_right_ca(tiny, token_file, tmp_path):
    plain, folder, key = tiny("gpt2", "client")
    cert, cert_key = _self_signed(tmp_path, "server")
    other, _ = _self_signed(tmp_path, "other")
    args = ("--token-file", str(token_file), "--ssl-certfile", str(cert), "--ssl-keyfile", str(cert_key))
    with served(str(folder), args=args, ca_bundle=str(cert)) as (_, url):
        assert url.startswith("https://")
        ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
        secure = SecureModelForCausalLM.from_pretrained(folder, key=key, server_url=url, server_token=ALICE,
                                                        ca_bundle=str(cert))
        kwargs = dict(max_new_tokens=8, do_sample=False)
        assert torch.equal(secure.generate(ids, **kwargs), plain.generate(ids, **kwargs))
        for bundle in (None, str(other)):
            with pytest.raises(ServerError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
                SecureModelForCausalLM.from_pretrained(folder, key=key, server_url=url, server_token=ALICE,
                                                       ca_bundle=bundle)
        with pytest.raises(ServerError):
            SecureModelForCausalLM.from_pretrained(folder, key=key, server_url=url.replace("https", "http"),
                                                   server_token=ALICE)
    with pytest.raises(UnknownOptionError, match="not a file"):
        SecureModelForCausalLM.from_pretrained(folder, key=key, server_url=url, ca_bundle=str(tmp_path / "none.pem"))


# -- graceful shutdown ----------------------------------------------------------------------------------------------------

def test_graceful_shutdown_finishes_in_flight_then_releases_the_port(tiny, token_file):
    plain, folder, key = tiny("gpt2", "client")
    with served(str(folder), args=("--token-file", str(token_file))) as (proc, url):
        secure = SecureModelForCausalLM.from_pretrained(folder, key=key, server_url=url, server_token=ALICE, timeout=5)
        ids = torch.arange(3, 10)[None]
        secure.generate(ids, max_new_tokens=2, do_sample=False)
        httpx.post(url + "/v1/sessions", headers=bearer(ALICE), timeout=30).raise_for_status()  # left open
        body = embeds(5)
        result = {}

        def slow_upload():  # in flight for ~1.5 s: the first half now, the rest after the SIGTERM
            yield body[: len(body) // 2]
            time.sleep(1.5)
            yield body[len(body) // 2 :]

        def request():
            result["response"] = httpx.post(url + "/v1/forward", content=slow_upload(), headers=bearer(BOB), timeout=30)

        thread = threading.Thread(target=request)
        thread.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        thread.join(30)
        assert result["response"].status_code == 200  # the in-flight request finished
        hidden = wire.decode(result["response"].content)[0]["hidden"]
        assert hidden.shape == (1, 5, 64)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once stopped
        assert "dropped 1 session(s)" in proc.read_log()  # the session left open
        start = time.monotonic()
        with pytest.raises(ServerError, match="unreachable"):
            secure.generate(ids, max_new_tokens=4, do_sample=False)
        assert time.monotonic() - start < 5
        port = int(url.rsplit(":", 1)[1])
        socket.create_server(("127.0.0.1", port)).close()  # the port is free again


def test_errors_are_json_with_an_error_field(guarded):
    url = guarded[1]
    for method, path, params, status in (("GET", "/nowhere", {}, 404), ("PUT", "/v1/info", {}, 405),
                                          ("POST", "/v1/forward", {"logits_to_keep": "1e9"}, 400)):
        response = httpx.request(method, url + path, params=params, headers=bearer(ALICE), timeout=30)
        assert response.status_code == status and response.json()["error"], response.text
    assert httpx.get(url + "/docs", timeout=30).status_code == 404


def test_idle_and_surplus_connections_are_dropped(tiny, token_file):
    """A connection that sends nothing, or half a request head, is closed after --head-timeout;
    past --max-connections a new connection is closed at once; the server answers throughout."""
    _, folder, _ = tiny("gpt2", "client")
    args = ("--token-file", str(token_file), "--max-connections", "4", "--head-timeout", "1")
    with served(str(folder), args=args) as (_, url):
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        idle[1].sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\n")  # half a head
        time.sleep(0.3)
        surplus = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        start = time.monotonic()
        assert [s.recv(1) for s in surplus[1:]] == [b""]  # closed at once: 4 were open already
        assert time.monotonic() - start < 0.9
        for sock in idle:
            assert sock.recv(1) == b""  # dropped after the head timeout
        assert time.monotonic() - start < 5
        assert httpx.get(url + "/v1/info", headers=bearer(ALICE), timeout=10).status_code == 200
        for sock in idle + surplus:
            sock.close()


def test_client_leaving_mid_body_leaves_no_traceback(tiny, token_file, tmp_path):
    _, folder, _ = tiny("gpt2", "client")
    log = tmp_path / "server.log"
    with served(str(folder), args=("--token-file", str(token_file))) as (proc, url):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(f"POST /v1/forward HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n"
                         "Content-Length: 1000\r\n\r\n0123456789".encode())
            time.sleep(0.3)
        time.sleep(0.5)
        assert httpx.get(url + "/v1/info", headers=bearer(ALICE), timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        output = proc.read_log()
    assert "Traceback" not in output and "ClientDisconnect" not in output and ALICE not in output


def test_encrypted_tls_key_is_refused_without_a_prompt(tiny, token_file, tmp_path, capsys):
    from cryptography.hazmat.primitives import serialization

    _, folder, _ = tiny("gpt2", "client")
    cert, key_path = _self_signed(tmp_path, "server")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.BestAvailableEncryption(b"secret")))
    assert main(["serve", str(folder), "--port", str(free_port()), "--token-file", str(token_file),
                 "--ssl-certfile", str(cert), "--ssl-keyfile", str(key_path)]) == 1
    assert "the TLS key is encrypted" in capsys.readouterr().err
