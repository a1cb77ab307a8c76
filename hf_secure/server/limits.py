"""Limits that hold before a request body is read.

:class:`RequestLimits` is plain ASGI middleware in front of the FastAPI app:

* a ``Content-Length`` over ``max_body_bytes`` is answered 413 before one byte of body is read;
* a body streamed without a length (chunked) is counted while it arrives and cut off with 413 at
  the limit, and one that stalls for ``body_timeout_s`` between chunks is cut off with 408;
* at most ``max_concurrent`` requests are in flight; the next one is answered 429 at once, with
  ``Retry-After`` (``/healthz`` is not counted);
* a client that disconnects while sending its body is dropped quietly.

:class:`GuardedH11Protocol` is uvicorn's h11 protocol with two limits on connections, which
uvicorn does not have: at most ``max_connections`` open connections (a new one past the cap is
closed at once), and a connection must send a complete request head within ``head_timeout_s`` of
connecting or of its previous answer (uvicorn times out only idle connections between requests,
so connections that send nothing, or half a head, would otherwise be held forever).

:class:`CallerSlots` bounds the requests in flight per authenticated caller (429 too), so that one
token cannot take every slot. Answers are JSON ``{"error": ...}`` like the app's own.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import TooManyRequestsError

RETRY_AFTER_S = 1

class _BodyError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status




class RequestLimits:
    """ASGI middleware: body size, body stall and global concurrency limits (see module doc)."""

    def __init__(self, app, max_body_bytes: int, max_concurrent: int, body_timeout_s: float = 30.0):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_concurrent = max_concurrent
        self.body_timeout_s = body_timeout_s
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        lengths = [v for k, v in scope["headers"] if k == b"content-length"]
        if lengths:
            if len(lengths) > 1 or not lengths[0].isdigit():
                return await _answer(scope, receive, send, 400, "malformed Content-Length header")
            if int(lengths[0]) > self.max_body_bytes:
                return await _answer(scope, receive, send, 413, f"request body of {int(lengths[0])} bytes exceeds "
                                                                f"this server's limit of {self.max_body_bytes} bytes")
        if scope["path"] == "/healthz":
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_concurrent:
            return await _answer(scope, receive, send, 429, f"the server has {self.in_flight} requests in flight, "
                                 "its limit: retry shortly", {"Retry-After": str(RETRY_AFTER_S)})
        received, started = 0, False

        async def capped_receive():
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except asyncio.TimeoutError:
                raise _BodyError(408, f"no request body for {self.body_timeout_s:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyError(413, f"request body exceeds this server's limit of {self.max_body_bytes} bytes")
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.in_flight += 1
        try:
            await self.app(scope, capped_receive, tracking_send)
        except _BodyError as exc:
            if started:
                raise
            await _answer(scope, receive, send, exc.status, str(exc))
        except ClientDisconnect:
            pass  # the client left mid-body: nobody to answer
        finally:
            self.in_flight -= 1


async def _answer(scope, receive, send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    await JSONResponse({"error": message}, status_code=status, headers=headers)(scope, receive, send)


class CallerSlots:
    """At most ``per_caller`` requests in flight per caller name (used inside the event loop)."""

    def __init__(self, per_caller: int):
        self.per_caller = per_caller
        self.in_flight: Counter[str] = Counter()

    def acquire(self, caller: str) -> None:
        if self.in_flight[caller] >= self.per_caller:
            raise TooManyRequestsError(f"{caller!r} has {self.in_flight[caller]} requests in flight, its limit: "
                                       "retry shortly")
        self.in_flight[caller] += 1

    def release(self, caller: str) -> None:
        self.in_flight[caller] -= 1
        if not self.in_flight[caller]:
            del self.in_flight[caller]


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a request-head deadline (module doc).

    Set ``max_connections`` and ``head_timeout_s`` on a subclass (:func:`guarded_protocol`).
    """

    max_connections = 1024
    head_timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.close()  # over the cap: no answer, the socket is freed at once
            return
        self._await_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_head()

    def _await_head(self) -> None:
        waiting_after = self.cycle  # a new request head replaces the cycle
        self.loop.call_later(self.head_timeout_s, self._drop_if_no_head, waiting_after)

    def _drop_if_no_head(self, waiting_after) -> None:
        if self.cycle is waiting_after and not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(max_connections: int, head_timeout_s: float) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` class with these limits, for ``uvicorn.Config(http=...)``."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"max_connections": max_connections, "head_timeout_s": head_timeout_s})
