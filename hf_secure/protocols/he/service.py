"""The he server as a separate process (``hf-secure serve DIR --protocol he``) and its client.

HTTP is driven by the client; an he query is not: the server needs the client in the middle of
it, once per refresh. So each query runs in a worker thread of its session, and the request
handlers talk to it through two queues. The client's calls, each answered with the query's
current *event* (a refresh request, the outputs, or "pending" after ``wait`` seconds, at most
``EVENT_WAIT_S``, of computing):

* ``PUT /v1/he/sessions/{id}/keys?offset=&total=`` -- the evaluation keys (one framed blob,
  :meth:`.backend.CKKS.evaluation_keys`), in chunks under the body limit; loaded when complete.
* ``POST /v1/he/sessions/{id}/query?wait=`` -- the encrypted inputs (``input.{i}``), the valid
  token positions (``valid``) and the block (metadata): starts the query (one at a time).
* ``POST /v1/he/sessions/{id}/answer?wait=`` -- the client's answer to the current refresh.
* ``GET /v1/he/sessions/{id}/event?wait=`` -- the current event again, or the next after
  "pending": an answer lost on the way is had again by asking.
* ``DELETE /v1/he/sessions/{id}/query`` -- cancel the running query (the client does on any error).

Sessions are opened and closed with the service's ``/v1/sessions`` routes, belong to the caller
that opened them, and hold its evaluation keys (hundreds of MB to GB: a few per caller). Faults:
a client that stops answering leaves its worker waiting; after ``answer_timeout_s`` the query
ends with an error; a query that fails or is cancelled leaves the session and its keys usable;
sessions idle for ``session_ttl_s`` are dropped with their keys and query. A server that goes
away is the client's :class:`~hf_secure.errors.ServerError` within its timeout
(:class:`~hf_secure.server.backends.HttpBackend`).

Wire: safetensors messages (:mod:`hf_secure.server.wire`); ciphertexts and keys travel as the
backend's framed bytes in ``uint8`` tensors, so a ciphertext of another key, another parameter
set or altered on the way is refused by the framing (KeyMismatchError, CorruptKeyError).
"""

from __future__ import annotations

import hashlib
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ...accounting import Traffic
from ...errors import HfSecureError, InvalidRequestError, QuotaExceededError, ServerError, UnknownSessionError
from ...families import family_of
from .layers import ffn_width

EVENT_WAIT_S = 10.0  # longest a request waits for the worker's next event before "pending"
MAX_KEY_BYTES = 4 << 30  # evaluation keys a session may upload (all-MiniLM-L6-v2's: ~0.7 GB)
CHUNK_BYTES = 64 << 20  # the client's key upload chunks (under the server's default body limit)


def as_bytes_tensor(blob: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)


def tensor_bytes(t: torch.Tensor, name: str) -> bytes:
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise InvalidRequestError(f"{name} must be a 1-D uint8 tensor (framed bytes)")
    return t.numpy().tobytes()


def client_digest(modules) -> str:
    """SHA-256 of the tensors (name, dtype, shape, values) of the modules the client holds (the
    embedding tables, a decoder's LM head; None where the family has none): client and server
    must hold the same, or the server's layers run on embeddings they were not made for."""
    h = hashlib.sha256()
    for module in (m for m in modules if m is not None):
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().contiguous().cpu()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


class _Query:
    """One query in a worker thread. Its handlers' side: :meth:`event` (the current event, until
    the client acts on it: a response lost on the way is had again by asking again), :meth:`answer`
    and :meth:`cancel`. :attr:`finished` is set by the worker when it ends, however it ends."""

    def __init__(self, server, block: int, inputs: list[bytes], valid: np.ndarray, answer_timeout_s: float,
                 decoder: dict):
        self.answer_timeout_s = answer_timeout_s
        self.events: queue.Queue = queue.Queue()
        self.answers: queue.Queue = queue.Queue()
        self.current: tuple[str, object] | None = None  # the event the client has not acted on
        self.cancelled = False
        self.finished = False
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, args=(server, block, inputs, valid, decoder), daemon=True,
                                       name="he-query")
        self.thread.start()

    def _run(self, server, block, inputs, valid, decoder):
        try:
            outputs, _ = server.forward(block, inputs, valid, self._refresh, **decoder)
            self.events.put(("outputs", outputs))
        except Exception as exc:  # reported to the client as the query's answer, never lost in the thread
            # the message only: the exception's traceback would keep the query's ciphertexts alive
            message = f"{type(exc).__name__}: {exc}"
            self.events.put(("error", (isinstance(exc, HfSecureError), message)))
        finally:
            self.finished = True

    def _refresh(self, request: bytes) -> bytes:
        if self.cancelled:
            raise ServerError("query cancelled")
        self.events.put(("refresh", request))
        try:
            answer = self.answers.get(timeout=self.answer_timeout_s)
        except queue.Empty:
            raise ServerError(f"the client sent no refresh answer within {self.answer_timeout_s:g} s: "
                              "query abandoned") from None
        if answer is None:
            raise ServerError("query cancelled")
        return answer

    def event(self, wait_s: float) -> tuple[str, object]:
        """The current event, waiting up to ``wait_s`` for the worker's next one ("pending")."""
        with self._lock:
            if self.current is not None and self.current[0] == "refresh" and self.finished:
                self.current = None  # the worker gave up waiting for its answer (timeout, cancel)
            if self.current is None:
                try:
                    self.current = self.events.get(timeout=wait_s)
                except queue.Empty:
                    return "pending", None
            return self.current

    def answer(self, payload: bytes) -> None:
        """The client's answer to the current refresh request."""
        with self._lock:
            if self.current is None or self.current[0] != "refresh" or self.finished:
                raise InvalidRequestError("no refresh of this session is waiting for an answer")
            self.current = None
            self.answers.put(payload)

    def cancel(self) -> None:
        """Stop the query at its next refresh (or now, if it waits for one)."""
        self.cancelled = True
        self.answers.put(None)


@dataclass
class _Session:
    owner: str
    keys: bytearray = field(default_factory=bytearray)
    keys_total: int = 0
    server: object = None  # an HEServer holding this session's evaluation keys
    query: _Query | None = None
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one request of the session at a time

    def running(self) -> bool:
        return self.query is not None and not self.query.finished


class HEService:
    """The he server of ``hf-secure serve --protocol he``: an unmodified BERT, GPT-2 or Llama-like
    checkpoint, the ranges calibrated on it, and one :class:`~.client.HEServer` per session (its
    keys, and a decoder's encrypted KV caches).

    Args:
        folder: the checkpoint (plain transformers; it never leaves the server).
        max_sessions: sessions (key sets) each caller may hold.
        session_ttl_s: seconds a session may stay idle before it is dropped.
        answer_timeout_s: seconds a query waits for the client's refresh answer.

    Raises UnsupportedModelError for a model the he protocol does not run.
    """

    protocol = "he"

    def __init__(self, folder: str, max_sessions: int = 2, session_ttl_s: float = 900.0,
                 answer_timeout_s: float = 300.0):
        from transformers import AutoConfig

        from ... import __version__
        from .client import MODEL_PARAMS, HEServer, check_model, client_parts, load_plain

        config = AutoConfig.from_pretrained(folder)
        family = family_of(config)
        check_model(config, causal=family.causal)
        plain = load_plain(folder, config)
        self.model = HEServer.from_model(folder, plain, MODEL_PARAMS)
        self.config = config
        self.section = {"protocol": "he", "hf_secure_version": __version__}
        self._info = {
            "protocol": "he", "family": family.name, "params": MODEL_PARAMS.as_dict(),
            "params_fingerprint": MODEL_PARAMS.fingerprint().hex(),
            "embeddings": client_digest(client_parts(plain)),
            "shape": shape_of(config), "bounds": self.model.bounds_dict(),
            "outputs": ["hidden"], "sessions": True,
        }
        self.max_sessions, self.session_ttl_s, self.answer_timeout_s = max_sessions, session_ttl_s, answer_timeout_s
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def info(self) -> dict:
        return dict(self._info)

    # -- sessions --------------------------------------------------------------------------------
    def open_session(self, owner: str) -> str:
        with self._lock:
            self._expire()
            held = sum(s.owner == owner for s in self._sessions.values())
            if held >= self.max_sessions:
                raise QuotaExceededError(f"{owner!r} holds {held} he sessions (each with its evaluation keys), its "
                                         "quota: close one (DELETE /v1/sessions/ID) or let idle ones expire "
                                         f"({self.session_ttl_s:g} s)")
            sid = secrets.token_hex(16)
            self._sessions[sid] = _Session(owner)
            return sid

    def close_session(self, sid: str, owner: str) -> None:
        with self._lock:
            session = self._owned(sid, owner)
            del self._sessions[sid]
        self._cancel(session)

    def close_all(self) -> int:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            self._cancel(s)
        return len(sessions)

    def forward(self, *args, **kwargs):
        raise InvalidRequestError("an he server answers /v1/he/sessions/{id}/query, not /v1/forward")

    def _owned(self, sid: str, owner: str) -> _Session:
        session = self._sessions.get(sid)
        if session is None or session.owner != owner:
            raise UnknownSessionError(f"unknown or expired session {sid!r}")
        session.last_used = time.monotonic()
        return session

    def _session(self, sid: str, owner: str) -> _Session:
        with self._lock:
            self._expire()
            return self._owned(sid, owner)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, sess in self._sessions.items() if now - sess.last_used > self.session_ttl_s]:
            self._cancel(self._sessions.pop(sid))

    @staticmethod
    def _cancel(session: _Session) -> None:
        if session.running():
            session.query.cancel()

    # -- keys and queries ------------------------------------------------------------------------
    def put_keys(self, sid: str, owner: str, chunk: bytes, offset: int, total: int) -> dict:
        """Append ``chunk`` at ``offset`` of the ``total``-byte evaluation keys (``total`` fixed by
        the first chunk); load them when complete (replacing the session's keys).
        InvalidRequestError for out-of-order chunks, a size over :data:`MAX_KEY_BYTES`, a running
        query, or keys the backend refuses (wrong parameters, altered)."""
        session = self._session(sid, owner)
        if not 0 < total <= MAX_KEY_BYTES:
            raise InvalidRequestError(f"evaluation keys of {total} bytes: outside 1..{MAX_KEY_BYTES}")
        with session.lock:
            if session.running():
                raise InvalidRequestError("a query of this session is running: keys cannot change under it")
            if offset == 0:
                session.keys, session.keys_total = bytearray(), total
            if offset != len(session.keys) or total != session.keys_total or offset + len(chunk) > total:
                raise InvalidRequestError(f"key chunk at {offset} of {len(chunk)} bytes of {total}: the session "
                                          f"holds {len(session.keys)} of {session.keys_total} bytes")
            session.keys += chunk
            if len(session.keys) < total:
                return {"received": len(session.keys), "loaded": False}
            blob, session.keys = bytes(session.keys), bytearray()
            try:
                session.server = self.model.with_keys(blob)
            except HfSecureError as exc:
                raise InvalidRequestError(f"evaluation keys refused: {exc}") from exc
            return {"received": total, "loaded": True}

    def start(self, sid: str, owner: str, block: int, inputs: list[bytes], valid: np.ndarray,
              wait_s: float = EVENT_WAIT_S, **decoder) -> tuple[str, object]:
        """Start a query (one at a time per session) and return its first event. ``decoder``:
        a decoder's ``cache`` (id), ``past`` and ``positions`` (:meth:`.client.HEServer.forward`)."""
        session = self._session(sid, owner)
        with session.lock:
            if session.server is None:
                raise InvalidRequestError("this session has no evaluation keys yet: upload them first")
            if session.running():
                raise InvalidRequestError("a query of this session is still running (one at a time; "
                                          "DELETE /v1/he/sessions/ID/query cancels it)")
            try:
                session.server.check_query(block, len(inputs), valid, **decoder)
            except HfSecureError as exc:
                raise InvalidRequestError(str(exc)) from exc
            session.query = _Query(session.server, block, inputs, valid, self.answer_timeout_s, decoder)
        return self._event(session, wait_s)

    def answer(self, sid: str, owner: str, payload: bytes, wait_s: float = EVENT_WAIT_S) -> tuple[str, object]:
        """Answer the current refresh request and return the next event."""
        session = self._session(sid, owner)
        self._query(session).answer(payload)
        return self._event(session, wait_s)

    def poll(self, sid: str, owner: str, wait_s: float = EVENT_WAIT_S) -> tuple[str, object]:
        """The current event of the session's query (the same again until the client acts on it)."""
        return self._event(self._session(sid, owner), wait_s)

    def drop_cache(self, sid: str, owner: str, cache: str) -> None:
        """Forget one of the session's KV caches (decoders; unknown ids are ignored)."""
        session = self._session(sid, owner)
        with session.lock:
            if session.running():
                raise InvalidRequestError("a query of this session is still running: its caches stay until it ends")
            if session.server is not None:
                session.server.drop(cache)

    def cancel(self, sid: str, owner: str) -> None:
        """Stop the session's query, if one runs (the session and its keys stay)."""
        self._cancel(self._session(sid, owner))

    @staticmethod
    def _query(session: _Session) -> _Query:
        if session.query is None:
            raise InvalidRequestError("this session has run no query")
        return session.query

    def _event(self, session: _Session, wait_s: float) -> tuple[str, object]:
        kind, payload = self._query(session).event(min(max(wait_s, 0.0), EVENT_WAIT_S))
        if kind == "error":
            known, message = payload
            if known:
                raise InvalidRequestError(f"the query failed: {message}")
            raise RuntimeError(f"the he query failed: {message}")  # a server bug: 500, logged
        return kind, payload


def shape_of(config) -> dict:
    """The dimensions client and server must agree on."""
    return {"model_type": config.model_type, "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
            "ffn": ffn_width(config), "vocab_size": config.vocab_size}


class RemoteHEServer:
    """The client's handle on an he server behind ``hf-secure serve`` (through an
    :class:`~hf_secure.server.backends.HttpBackend`): the same calls as the in-process
    :class:`~.client.HEServer` (``load_keys``, ``forward``), over one session."""

    def __init__(self, backend, info: dict):
        self.backend, self.info = backend, info
        self.session = backend.open_session()

    def bounds_dict(self) -> dict:
        return dict(self.info["bounds"])

    def load_keys(self, blob: bytes) -> None:
        path = f"/v1/he/sessions/{self.session}/keys"
        for offset in range(0, len(blob), CHUNK_BYTES):
            self.backend.call("PUT", path, {"data": as_bytes_tensor(blob[offset:offset + CHUNK_BYTES])},
                              params={"offset": offset, "total": len(blob)})

    def forward(self, block: int, inputs: list[bytes], valid: np.ndarray, answer, cache: str | None = None,
                past: int = 0, positions: np.ndarray | None = None) -> tuple[list[bytes], Traffic]:
        """Run the query; ``answer(request) -> bytes`` answers each refresh; a decoder's ``cache``,
        ``past`` and ``positions`` as :meth:`.client.HEServer.forward`. Returns the outputs and
        the refreshes' traffic (the server's side: ``bytes_sent`` are the requests). On any error
        (the client's or the server's) the server's query is cancelled, the session kept."""
        base = f"/v1/he/sessions/{self.session}"
        # each request waits at most a third of the client's timeout for the next event
        wait = {"wait": min(EVENT_WAIT_S, self.backend.timeout / 3)}
        tensors = {f"input.{i}": as_bytes_tensor(b) for i, b in enumerate(inputs)}
        tensors["valid"] = torch.from_numpy(np.asarray(valid, dtype=np.float64))
        meta = {"block": str(block)}
        if cache is not None:
            tensors["positions"] = torch.from_numpy(np.asarray(positions, dtype=np.int64))
            meta.update(cache=cache, past=str(past))
        traffic = Traffic()
        try:
            reply = self.backend.call("POST", f"{base}/query", tensors, meta=meta, params=wait)
            while True:
                tensors, meta = reply
                event = meta.get("event")
                if event == "outputs":
                    count = int(meta.get("count", -1))
                    try:
                        return [tensor_bytes(tensors[f"output.{i}"], "output") for i in range(count)], traffic
                    except (KeyError, InvalidRequestError) as exc:
                        raise ServerError(f"the he server sent malformed outputs: {exc}") from exc
                if event == "refresh":
                    start = time.perf_counter()
                    if "request" not in tensors:
                        raise ServerError("the he server sent a refresh event without its request")
                    request = tensor_bytes(tensors["request"], "refresh request")
                    response = answer(request)
                    reply = self.backend.call("POST", f"{base}/answer", {"answer": as_bytes_tensor(response)},
                                              params=wait)
                    traffic.record(len(request), len(response), time.perf_counter() - start)
                elif event == "pending":
                    reply = self.backend.call("GET", f"{base}/event", params=wait)
                else:
                    raise ServerError(f"the he server sent an unknown event {event!r}")
        except BaseException:
            self._cancel()
            raise

    def drop(self, cache: str) -> None:
        """Forget a KV cache on the server (a server gone takes its caches with it)."""
        try:
            self.backend.call("DELETE", f"/v1/he/sessions/{self.session}/caches/{cache}")
        except ServerError:
            pass

    def _cancel(self) -> None:
        try:
            self.backend.call("DELETE", f"/v1/he/sessions/{self.session}/query")
        except ServerError:
            pass  # the server is gone, or the query ended: nothing runs

    def close(self) -> None:
        try:
            self.backend.close_session(self.session)
        except ServerError:
            pass  # the server is gone: its session goes with it
        self.backend.close()


def event_message(kind: str, payload) -> tuple[dict, dict]:
    """The wire message of an event (see the module docstring)."""
    if kind == "refresh":
        return {"request": as_bytes_tensor(payload)}, {"event": "refresh"}
    if kind == "outputs":
        return ({f"output.{i}": as_bytes_tensor(b) for i, b in enumerate(payload)},
                {"event": "outputs", "count": str(len(payload))})
    return {}, {"event": "pending"}
