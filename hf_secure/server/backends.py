"""How a client reaches the server: in the same process, or over HTTP.

Both backends expose the same four calls (``info``, ``open_session``, ``close_session``,
``forward``) so that the drop-in models do not care where the server runs. The HTTP backend maps
every transport failure to :class:`~hf_secure.errors.ServerError` within its timeout.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import ssl
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from ..accounting import Traffic
from ..errors import InvalidRequestError, ServerError, UnknownOptionError
from . import wire
from .access import check_client_token
from .runtime import ModelServer

CLIENT_TOKEN_ENV = "HF_SECURE_TOKEN"


@contextlib.contextmanager
def _as_server_error():
    try:
        yield
    except InvalidRequestError as exc:
        raise ServerError(f"server rejected the request: {exc}") from exc


class InProcessBackend:
    """Calls a :class:`ModelServer` living in this process (no serialisation)."""

    def __init__(self, server: ModelServer):
        self.server = server
        self.stats = Traffic()

    def info(self) -> dict:
        return self.server.info()

    def open_session(self) -> str:
        with _as_server_error():
            return self.server.open_session()

    def close_session(self, session_id: str) -> None:
        with _as_server_error():
            self.server.close_session(session_id)

    def close(self) -> None:
        """Nothing to release: the server lives in this process and goes with it."""

    def forward(self, inputs, session_id=None, past_length=0, output="hidden", logits_to_keep=0):
        start = time.perf_counter()
        with _as_server_error():
            outputs, length = self.server.forward(inputs, session_id, past_length, output, logits_to_keep)
        self.stats.record(_nbytes(inputs), _nbytes(outputs), time.perf_counter() - start)
        return outputs, length


class HttpBackend:
    """Talks to ``hf-secure serve`` at ``url``.

    Args:
        url: ``http://`` or ``https://`` address of the server.
        timeout: seconds every call may take, retries of a busy server (429 with Retry-After) included.
        token: the bearer token the operator issued; None reads ``HF_SECURE_TOKEN``. It is sent
            only over https or to a loopback address (UnknownOptionError otherwise).
        ca_bundle: PEM file of the certificate authorities to trust for https (e.g. a
            self-signed server's certificate); None trusts the system's.
    """

    def __init__(self, url: str, timeout: float = 60.0, token: str | None = None, ca_bundle: str | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UnknownOptionError(f"server_url must be http://HOST:PORT or https://HOST:PORT, not {url!r}")
        token = token if token is not None else os.environ.get(CLIENT_TOKEN_ENV)
        if token is not None:
            token = check_client_token(token)
        if token is not None and parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise UnknownOptionError(f"refusing to send the server token in clear to {parts.hostname}: use https://")
        verify: bool | ssl.SSLContext = True
        if ca_bundle is not None:
            if not Path(ca_bundle).is_file():
                raise UnknownOptionError(f"CA bundle {ca_bundle} is not a file")
            try:
                verify = ssl.create_default_context(cafile=str(ca_bundle))
            except ssl.SSLError as exc:
                raise UnknownOptionError(f"CA bundle {ca_bundle} holds no readable PEM certificate: {exc}") from None
        self.url = url.rstrip("/")
        self.timeout = timeout
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}
        self.client = httpx.Client(base_url=self.url, timeout=timeout, verify=verify, headers=headers)
        self.stats = Traffic()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                response = self.client.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                raise ServerError(f"server {self.url} unreachable or timed out ({type(exc).__name__}: {exc})") from exc
            retry_after = response.headers.get("retry-after", "")
            if response.status_code != 429 or not retry_after.isdigit():
                break
            wait = max(int(retry_after), 0.05)  # busy, not over quota: retry within the timeout
            if time.monotonic() + wait > deadline:
                break
            time.sleep(wait)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            detail = (body.get("error") or body.get("detail")) if isinstance(body, dict) else response.text[:200]
            raise ServerError(f"server {self.url} answered {response.status_code}: {detail}")
        return response

    def info(self) -> dict:
        return self._request("GET", "/v1/info").json()

    def open_session(self) -> str:
        return self._request("POST", "/v1/sessions").json()["session_id"]

    def close_session(self, session_id: str) -> None:
        self._request("DELETE", f"/v1/sessions/{session_id}")

    def forward(self, inputs, session_id=None, past_length=0, output="hidden", logits_to_keep=0):
        params = {"past_length": past_length, "output": output, "logits_to_keep": logits_to_keep}
        if session_id is not None:
            params["session_id"] = session_id
        outputs, meta = self.call("POST", "/v1/forward", inputs, params=params)
        return outputs, int(meta.get("length", 0))

    def call(self, method: str, path: str, tensors: dict | None = None, meta: dict | None = None,
             params: dict | None = None) -> tuple[dict, dict]:
        """One request whose body (if ``tensors``) and answer are wire messages: the routes a
        protocol adds of its own (he's ``/v1/he/...``). Counted in :attr:`stats`."""
        body = wire.encode(tensors, meta) if tensors is not None else None
        headers = {"content-type": wire.CONTENT_TYPE} if body is not None else {}
        start = time.perf_counter()
        response = self._request(method, path, params=params, content=body, headers=headers)
        try:
            outputs, answer_meta = wire.decode(response.content)
        except InvalidRequestError as exc:
            raise ServerError(f"server {self.url} sent a malformed answer: {exc}") from exc
        self.stats.record(len(body or b""), len(response.content), time.perf_counter() - start)
        return outputs, answer_meta

    def close(self) -> None:
        self.client.close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
