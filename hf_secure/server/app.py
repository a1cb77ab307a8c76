"""``hf-secure serve``: the HTTP service around :class:`~hf_secure.server.runtime.ModelServer`.

Routes (bodies are safetensors messages, see :mod:`hf_secure.server.wire`):

* ``GET /healthz`` -- ``{"status": "ok"}`` once the checkpoint is loaded; open, like
  ``/openapi.json`` (the API schema).
* ``GET /v1/info`` -- protocol, key fingerprint, weight digests, available outputs (JSON).
* ``POST /v1/sessions`` -- open a KV-cache session (JSON ``{"session_id": ...}``).
* ``DELETE /v1/sessions/{id}`` -- drop one of the caller's sessions.
* ``POST /v1/forward?session_id=&past_length=&output=&logits_to_keep=`` -- run the model on the
  tensors in the body; the answer carries the outputs and metadata ``length`` (cached tokens).

Access (:mod:`~hf_secure.server.access`): every ``/v1`` route needs ``Authorization: Bearer TOKEN``
when the server has tokens. Answers: 400 malformed request or parameter, 401 missing or unknown
token, 404 unknown session (or another caller's) or route, 405 wrong method, 408 stalled body, 413
body over the limit, 429 a quota or a concurrency limit (the latter with ``Retry-After``); each
with JSON ``{"error": ...}``. Nothing of the tensors or tokens is logged.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
import torch

from ..errors import (
    InvalidRequestError,
    QuotaExceededError,
    ServerError,
    TooManyRequestsError,
    UnauthorizedError,
    UnknownOptionError,
    UnknownSessionError,
)
from . import wire
from .access import SERVER_TOKENS_ENV, AccessPolicy
from .limits import RETRY_AFTER_S, CallerSlots, RequestLimits, guarded_protocol
from .runtime import OUTPUTS, ModelServer


@dataclass(frozen=True)
class ServeLimits:
    """Request limits of ``hf-secure serve`` (see :mod:`~hf_secure.server.limits`).

    max_body_bytes: largest request body; max_concurrent: requests in flight in all;
    max_concurrent_per_caller: in flight per token; body_timeout_s: longest wait for the next
    chunk of a body; max_connections: open connections; head_timeout_s: time a connection has to
    send a complete request head.
    """

    max_body_bytes: int = 256 << 20
    max_concurrent: int = 128
    max_concurrent_per_caller: int = 8
    body_timeout_s: float = 30.0
    max_connections: int = 1024
    head_timeout_s: float = 10.0

    def __post_init__(self):
        counts = (self.max_body_bytes, self.max_concurrent, self.max_concurrent_per_caller, self.max_connections)
        if min(counts) < 1 or min(self.body_timeout_s, self.head_timeout_s) <= 0:
            raise UnknownOptionError(f"request limits must be positive: {self}")
        if self.max_body_bytes > wire.MAX_MESSAGE_BYTES:
            raise UnknownOptionError(f"the largest body a server takes is {wire.MAX_MESSAGE_BYTES >> 20} MiB")


_STATUS = ((UnknownSessionError, 404), (UnauthorizedError, 401), (QuotaExceededError, 429),
           (TooManyRequestsError, 429), (InvalidRequestError, 400))

# What the OpenAPI schema says of the bodies FastAPI cannot infer (fuzzers generate from it).
_ERROR = {"description": "Malformed request", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}}}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_GUARDED = {400: _ERROR, 401: {**_ERROR, "description": "Missing or unknown bearer token"},
            413: {**_ERROR, "description": "Body over the server's limit"},
            429: {**_ERROR, "description": "Over a quota, or too many requests in flight (Retry-After)"}}
_SESSION = {404: {**_ERROR, "description": "Unknown or expired session"}}
_FORWARD = {
    "openapi_extra": {"requestBody": {"required": True, "content": {wire.CONTENT_TYPE: _BINARY}}},
    "responses": {200: {"content": {wire.CONTENT_TYPE: _BINARY}}, **_GUARDED, **_SESSION},
    "response_class": Response,
}


def create_app(server: ModelServer, access: AccessPolicy, limits: ServeLimits = ServeLimits()) -> FastAPI:
    """The FastAPI app serving ``server`` to the callers ``access`` admits, within ``limits``."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        dropped = server.close_all()  # uvicorn has let in-flight requests finish
        print(f"stopped; dropped {dropped} session(s)", flush=True)

    app = FastAPI(title="hf_secure server", version=server.section.get("hf_secure_version", ""), lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.add_middleware(RequestLimits, max_body_bytes=limits.max_body_bytes, max_concurrent=limits.max_concurrent,
                       body_timeout_s=limits.body_timeout_s)
    bearer = HTTPBearer(auto_error=False, description="a token listed by the operator (`serve --token-file`)")
    slots = CallerSlots(limits.max_concurrent_per_caller)

    async def caller(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        """The name of the token the request carries; holds one of its in-flight slots."""
        name = access.identify(credentials.credentials if credentials is not None else None)
        if name is None:
            raise UnauthorizedError("missing or unknown bearer token: send `Authorization: Bearer TOKEN` with a token "
                                    "the operator issued (client: server_token= or HF_SECURE_TOKEN)")
        slots.acquire(name)
        try:
            yield name
        finally:
            slots.release(name)

    @app.exception_handler(InvalidRequestError)
    async def invalid(_: Request, exc: InvalidRequestError):
        status = next(code for kind, code in _STATUS if isinstance(exc, kind))
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        if isinstance(exc, TooManyRequestsError):
            headers["Retry-After"] = str(RETRY_AFTER_S)
        return JSONResponse({"error": str(exc)}, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):  # unknown route, wrong method
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(_: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request parameters: {problems}"}, status_code=400)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/v1/info", responses=_GUARDED)
    def info(_: str = Depends(caller)):
        return server.info()

    @app.post("/v1/sessions", responses=_GUARDED)
    def open_session(owner: str = Depends(caller)):
        return {"session_id": server.open_session(owner)}

    @app.delete("/v1/sessions/{session_id}", responses={**_GUARDED, **_SESSION})
    def close_session(session_id: str, owner: str = Depends(caller)):
        server.close_session(session_id, owner)
        return {"closed": True}

    @app.post("/v1/forward", **_FORWARD)
    async def forward(
        request: Request,
        session_id: str | None = None,
        past_length: int = 0,
        output: str = "hidden",
        logits_to_keep: int = 0,
        owner: str = Depends(caller),
    ):
        if output not in OUTPUTS:
            raise InvalidRequestError(f"output must be one of {OUTPUTS}")
        inputs, _ = wire.decode(await request.body())  # after the token check: strangers upload nothing
        outputs, length = await run_in_threadpool(server.forward, inputs, session_id, past_length, output,
                                                  logits_to_keep, owner)
        return Response(wire.encode(outputs, {"length": str(length)}), media_type=wire.CONTENT_TYPE)

    if getattr(server, "protocol", None) == "he":
        _he_routes(app, server, caller)
    return app


def _he_routes(app: FastAPI, service, caller) -> None:
    """The he protocol's routes (:mod:`hf_secure.protocols.he.service`): evaluation keys, and
    queries whose refreshes come back to the client as events."""
    from ..protocols.he.service import EVENT_WAIT_S, event_message, tensor_bytes

    def reply(event) -> Response:
        return Response(wire.encode(*event_message(*event)), media_type=wire.CONTENT_TYPE)

    def named(tensors: dict, name: str) -> bytes:
        if name not in tensors:
            raise InvalidRequestError(f"the message lacks {name!r}")
        return tensor_bytes(tensors[name], name)

    @app.put("/v1/he/sessions/{session_id}/keys", **_FORWARD)
    async def keys(request: Request, session_id: str, offset: int, total: int, owner: str = Depends(caller)):
        tensors, _ = wire.decode(await request.body())
        done = await run_in_threadpool(service.put_keys, session_id, owner, named(tensors, "data"), offset, total)
        return Response(wire.encode({}, {k: str(v) for k, v in done.items()}), media_type=wire.CONTENT_TYPE)

    @app.post("/v1/he/sessions/{session_id}/query", **_FORWARD)
    async def query(request: Request, session_id: str, wait: float = EVENT_WAIT_S, owner: str = Depends(caller)):
        tensors, meta = wire.decode(await request.body())
        count = sum(name.startswith("input.") for name in tensors)
        block = meta.get("block", "")
        cache, past = meta.get("cache"), meta.get("past", "0")  # decoders: the KV cache continued
        extra = {"positions"} if cache is not None else set()
        if (set(tensors) != {f"input.{i}" for i in range(count)} | {"valid"} | extra
                or not re.fullmatch(r"[0-9]{1,6}", block) or not re.fullmatch(r"[0-9]{1,6}", past)
                or (cache is None and "past" in meta)
                or (cache is not None and not re.fullmatch(r"[A-Za-z0-9/_-]{1,64}", cache))):
            raise InvalidRequestError("an he query sends input.0 .. input.{n-1}, valid and the block (metadata); "
                                      "a decoder's also its cache id, past (metadata) and positions")
        valid = tensors["valid"]
        if valid.dtype != torch.float64 or valid.dim() != 1:
            raise InvalidRequestError("valid must be a 1-D float64 tensor")
        decoder = {}
        if cache is not None:
            positions = tensors["positions"]
            if positions.dtype != torch.int64 or positions.dim() != 1:
                raise InvalidRequestError("positions must be a 1-D int64 tensor")
            decoder = {"cache": cache, "past": int(past), "positions": positions.numpy().copy()}
        inputs = [named(tensors, f"input.{i}") for i in range(count)]
        event = await run_in_threadpool(service.start, session_id, owner, int(block), inputs, valid.numpy().copy(),
                                        wait, **decoder)
        return reply(event)

    @app.post("/v1/he/sessions/{session_id}/answer", **_FORWARD)
    async def answer(request: Request, session_id: str, wait: float = EVENT_WAIT_S, owner: str = Depends(caller)):
        tensors, _ = wire.decode(await request.body())
        return reply(await run_in_threadpool(service.answer, session_id, owner, named(tensors, "answer"), wait))

    @app.get("/v1/he/sessions/{session_id}/event", responses={**_GUARDED, **_SESSION})
    async def event(session_id: str, wait: float = EVENT_WAIT_S, owner: str = Depends(caller)):
        return reply(await run_in_threadpool(service.poll, session_id, owner, wait))

    @app.delete("/v1/he/sessions/{session_id}/caches/{cache:path}", responses={**_GUARDED, **_SESSION})
    async def drop(session_id: str, cache: str, owner: str = Depends(caller)):
        await run_in_threadpool(service.drop_cache, session_id, owner, cache)
        return Response(wire.encode({}, {"dropped": "true"}), media_type=wire.CONTENT_TYPE)

    @app.delete("/v1/he/sessions/{session_id}/query", responses={**_GUARDED, **_SESSION})
    async def cancel(session_id: str, owner: str = Depends(caller)):
        await run_in_threadpool(service.cancel, session_id, owner)
        return Response(wire.encode({}, {"cancelled": "true"}), media_type=wire.CONTENT_TYPE)


def serve(folder: str, host: str = "127.0.0.1", port: int = 8000, *, access: AccessPolicy, no_auth: bool = False,
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None, limits: ServeLimits = ServeLimits(),
          shutdown_timeout_s: float = 30.0, protocol: str | None = None, **server_kwargs) -> None:
    """Load and verify the checkpoint, listen on ``host:port``, then serve until SIGTERM or SIGINT.

    ``protocol``: None serves a converted (permute) checkpoint with :class:`ModelServer`; ``"he"``
    an unmodified BERT, GPT-2 or Llama-like checkpoint with :class:`~hf_secure.protocols.he.service.HEService`
    (``server_kwargs``: its ``max_sessions``, ``session_ttl_s``, ``answer_timeout_s``).

    On shutdown the port stops accepting, in-flight requests get ``shutdown_timeout_s`` to finish,
    then every session is dropped and the port released.

    Raises (before anything is served) ServerError when the address cannot be bound (port taken,
    host not one of this machine's addresses, privileges); UnknownOptionError when the TLS files do
    not load, when a non-loopback address has no token and ``no_auth`` is not given, when tokens
    would cross the network in clear (non-loopback without TLS), or when tokens and ``no_auth`` are
    both given.
    """
    import uvicorn

    if no_auth and not access.open:
        raise UnknownOptionError(f"--no-auth contradicts the tokens given (--token-file or {SERVER_TOKENS_ENV})")
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise UnknownOptionError("TLS needs both --ssl-certfile and --ssl-keyfile")
    if ssl_certfile is not None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                ssl_certfile, ssl_keyfile, password=_no_passphrase)
        except (OSError, ssl.SSLError) as exc:
            raise UnknownOptionError(f"cannot load the TLS certificate {ssl_certfile} with key {ssl_keyfile}: {exc}") from None
    try:
        sock = _listen(host, port)  # first: a taken port fails before a long load
    except socket.gaierror as exc:
        raise ServerError(f"cannot listen on {host}: no such address ({exc.strerror})") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ServerError(f"cannot listen on {host}:{port} ({reason}): is another server running there? "
                          "choose another --port or --host") from None
    with sock:
        if not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
            if access.open and not no_auth:
                raise UnknownOptionError(
                    f"{host} is reachable from other machines and no token is configured: give --token-file (or "
                    f"{SERVER_TOKENS_ENV}), or --no-auth to serve anyone who can reach the port")
            if not access.open and ssl_certfile is None:
                raise UnknownOptionError(
                    f"bearer tokens would cross the network to {host} in clear: give --ssl-certfile/--ssl-keyfile, "
                    "or listen on a loopback address behind a TLS proxy")
        if protocol == "he":
            from ..protocols.he.service import HEService

            model = HEService(folder, **server_kwargs)
        elif protocol is None:
            model = ModelServer(folder, **server_kwargs)
        else:
            raise UnknownOptionError(f"hf-secure serve runs permute checkpoints or protocol 'he', not {protocol!r}")
        app = create_app(model, access, limits)
        scheme = "https" if ssl_certfile else "http"
        who = "open to anyone who reaches it" if access.open else f"{len(access.callers)} token(s)"
        shown = f"[{host}]" if ":" in host else host
        print(f"serving {folder} on {scheme}://{shown}:{port} ({who})", flush=True)
        config = uvicorn.Config(app, log_level="warning", ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                                http=guarded_protocol(limits.max_connections, limits.head_timeout_s),
                                timeout_graceful_shutdown=shutdown_timeout_s)
        uvicorn.Server(config).run(sockets=[sock])  # on SIGTERM it re-raises the signal once stopped


def _no_passphrase():
    raise UnknownOptionError("the TLS key is encrypted: give it unencrypted, readable by the server's user only "
                             "(`openssl pkey -in KEY -out PLAIN_KEY`, then chmod 600)")


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``. Its protocol is IPPROTO_TCP, not 0 as
    ``socket.create_server`` leaves it: asyncio sets TCP_NODELAY only on sockets that say TCP, and
    without it every response waits for the client's delayed ACK (40 ms on Linux)."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)[0]
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen()
    except OSError:
        sock.close()
        raise
    return sock
