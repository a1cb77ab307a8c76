"""How a client reaches the server: in the same process, or over HTTP.

Both backends expose the same four calls (``info``, ``open_session``, ``close_session``,
``forward``) so that the drop-in models do not care where the server runs. The HTTP backend maps
every transport failure to :class:`~hf_secure.errors.ServerError` within its timeout.
"""

from __future__ import annotations

import time

import httpx

from ..accounting import Traffic
from ..errors import InvalidRequestError, ServerError
from . import wire
from .runtime import ModelServer


class InProcessBackend:
    """Calls a :class:`ModelServer` living in this process (no serialisation)."""

    def __init__(self, server: ModelServer):
        self.server = server
        self.stats = Traffic()

    def info(self) -> dict:
        return self.server.info()

    def open_session(self) -> str:
        return self.server.open_session()

    def close_session(self, session_id: str) -> None:
        self.server.close_session(session_id)

    def forward(self, inputs, session_id=None, past_length=0, output="hidden", logits_to_keep=0):
        start = time.perf_counter()
        try:
            outputs, length = self.server.forward(inputs, session_id, past_length, output, logits_to_keep)
        except InvalidRequestError as exc:
            raise ServerError(f"server rejected the request: {exc}") from exc
        self.stats.record(_nbytes(inputs), _nbytes(outputs), time.perf_counter() - start)
        return outputs, length


class HttpBackend:
    """Talks to ``hf-secure serve`` at ``url``; ``timeout`` bounds every call, in seconds."""

    def __init__(self, url: str, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, timeout=timeout)
        self.stats = Traffic()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServerError(f"server {self.url} unreachable or timed out ({type(exc).__name__}: {exc})") from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("error") or response.json().get("detail")
            except ValueError:
                detail = response.text[:200]
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
        body = wire.encode(inputs)
        start = time.perf_counter()
        response = self._request("POST", "/v1/forward", params=params, content=body,
                                 headers={"content-type": wire.CONTENT_TYPE})
        try:
            outputs, meta = wire.decode(response.content)
        except InvalidRequestError as exc:
            raise ServerError(f"server {self.url} sent a malformed answer: {exc}") from exc
        self.stats.record(len(body), len(response.content), time.perf_counter() - start)
        return outputs, int(meta.get("length", 0))

    def close(self) -> None:
        self.client.close()


def _nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
