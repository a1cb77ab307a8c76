"""``hf-secure serve``: the HTTP service around :class:`~hf_secure.server.runtime.ModelServer`.

Routes (bodies are safetensors messages, see :mod:`hf_secure.server.wire`):

* ``GET /v1/info`` -- protocol, key fingerprint, weight digests, available outputs (JSON).
* ``POST /v1/sessions`` -- open a KV-cache session (JSON ``{"session_id": ...}``).
* ``DELETE /v1/sessions/{id}`` -- drop a session.
* ``POST /v1/forward?session_id=&past_length=&output=&logits_to_keep=`` -- run the model on the
  tensors in the body; the answer carries the outputs and metadata ``length`` (cached tokens).

Malformed requests get 400 with ``{"error": ...}``, unknown sessions 404; nothing is logged of
the tensors themselves.
"""

from __future__ import annotations

import os
import socket

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..errors import InvalidRequestError, ServerError, UnknownSessionError
from . import wire
from .runtime import OUTPUTS, ModelServer

# What the OpenAPI schema says of the bodies FastAPI cannot infer (fuzzers generate from it).
_ERROR = {"description": "Malformed request", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}}}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_FORWARD = {
    "openapi_extra": {"requestBody": {"required": True, "content": {wire.CONTENT_TYPE: _BINARY}}},
    "responses": {200: {"content": {wire.CONTENT_TYPE: _BINARY}}, 400: _ERROR,
                  404: {**_ERROR, "description": "Unknown or expired session"}},
    "response_class": Response,
}


def create_app(server: ModelServer) -> FastAPI:
    app = FastAPI(title="hf_secure server", version=server.section.get("hf_secure_version", ""))

    @app.exception_handler(InvalidRequestError)
    async def invalid(_: Request, exc: InvalidRequestError):
        status = 404 if isinstance(exc, UnknownSessionError) else 400
        return JSONResponse({"error": str(exc)}, status_code=status)

    @app.get("/v1/info")
    def info():
        return server.info()

    @app.post("/v1/sessions", responses={400: _ERROR})
    def open_session():
        return {"session_id": server.open_session()}

    @app.delete("/v1/sessions/{session_id}")
    def close_session(session_id: str):
        return {"closed": server.close_session(session_id)}

    @app.post("/v1/forward", **_FORWARD)
    async def forward(
        request: Request,
        session_id: str | None = None,
        past_length: int = 0,
        output: str = "hidden",
        logits_to_keep: int = 0,
    ):
        if output not in OUTPUTS:
            raise InvalidRequestError(f"output must be one of {OUTPUTS}")
        inputs, _ = wire.decode(await request.body())
        outputs, length = await run_in_threadpool(server.forward, inputs, session_id, past_length, output, logits_to_keep)
        return Response(wire.encode(outputs, {"length": str(length)}), media_type=wire.CONTENT_TYPE)

    return app




def serve(folder: str, host: str = "127.0.0.1", port: int = 8000, **server_kwargs) -> None:
    """Load and verify the checkpoint, listen on ``host:port``, then serve until interrupted.

    Raises ServerError (before anything is served) when the address cannot be bound: the port is
    taken, the host is not one of this machine's addresses, or binding needs privileges.
    """
    import uvicorn

    try:
        sock = socket.create_server((host, port))  # first: a taken port fails before a long load
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ServerError(f"cannot listen on {host}:{port} ({reason}): is another server running there? "
                          "choose another --port or --host") from None
    with sock:
        app = create_app(ModelServer(folder, **server_kwargs))
        print(f"serving {folder} on http://{host}:{port}", flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
