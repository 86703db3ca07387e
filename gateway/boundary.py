"""The app's outer edge: request ids, the one catch-all for unexpected exceptions, and the request body limit.

Two pure ASGI middlewares (no ``BaseHTTPMiddleware``: it would buffer streams and add a task per request):

- ``RequestBoundary`` (outermost): takes the client's ``x-request-id`` when it is a sane token, makes one
  otherwise, and returns it on every response. Anything a route lets escape before the response started becomes
  the OpenAI error body (500, ``server_error``) carrying the id, logged once with its traceback and the id. Errors
  after the response started belong to the stream (``gateway.sse`` ends it with an error event and ``[DONE]``).
- ``BodyLimit``: a request whose ``Content-Length`` exceeds the limit gets 413 at once; a chunked body that grows
  past it while it is read fails the read with 413 (rendered by the app's handlers in the OpenAI shape). Not
  Starlette's ``RequestBodyLimitMiddleware``: it replaces any answer to an oversized ``Content-Length`` with a
  plain-text 413.

The request id lives in ``scope["state"]["request_id"]`` (``request.state.request_id`` in routes) and in the
``request_id`` context variable for log lines deep in the flow (a context variable holds one value per request
task, so it is no shared mutable state).
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayError, PayloadTooLarge, error_response

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


class RequestBoundary:
    """Request id on every response; any unexpected exception → OpenAI 500 body with the id (see module doc)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        rid = given if _SANE_ID.fullmatch(given) else new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id.set(rid)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            log.exception("request %s %s failed (request id %s)", scope.get("method"), scope.get("path"), rid)
            if started:
                raise  # the status line is gone; the server closes the connection, which is all that is left
            error = GatewayError(f"The server had an error while processing your request (request id {rid}). "
                                 f"Cause: {type(exc).__name__}.")
            await error_response(error)(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


class BodyLimit:
    """413 for a request body over ``max_bytes`` (``Content-Length`` checked first, chunked bodies as they come)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body is larger than this server accepts ({self.max_bytes} bytes; "
                               f"see --max-body-bytes).")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await error_response(self._error())(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException is what FastAPI lets through from a body read (anything else becomes 400).
                    raise HTTPException(413, self._error().message)
            return message

        await self.app(scope, limited_receive, send)
