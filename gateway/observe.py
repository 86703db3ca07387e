"""``AccessObserver``: one ``RequestContext`` per request, and at its end one access-log line and its metrics.

A pure ASGI middleware just inside ``gateway.boundary.RequestBoundary`` (so the request id exists and every
answer, the catch-all 500 included, passes through it). It

- makes a ``RequestContext`` current for the request (``gateway.request_context``), wired to the app's
  ``gateway.metrics.Metrics`` (waiting -> running when the first output arrives);
- notes the status, whether the client hung up before the response ended, and the end time;
- then runs the context's ``on_end`` callbacks (limits), records the request in the metrics and writes one JSON
  line to the ``gateway.access`` logger.

The line (JSON through the stdlib ``json`` module; keys always present, ``null`` when unknown)::

    {"request_id", "method", "path", "status", "model", "adapter", "variant", "backend", "replica", "key",
     "prompt_tokens", "completion_tokens", "ttft_s", "total_s", "finish_reason", "client_disconnected",
     "error_type"}

``finish_reason`` is a string, or a list for ``n > 1``. Probes and scrapes (``/health``, ``/ready``,
``/metrics``) are logged at DEBUG, everything else at INFO.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.metrics import Metrics
from gateway.request_context import RequestContext, activate, deactivate

log = logging.getLogger(__name__)
access_log = logging.getLogger("gateway.access")

QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})


def access_record(ctx: RequestContext) -> dict[str, Any]:
    reasons: Any = ctx.finish_reasons[0] if len(ctx.finish_reasons) == 1 else (ctx.finish_reasons or None)
    return {
        "request_id": ctx.request_id,
        "method": ctx.method,
        "path": ctx.path,
        "status": ctx.status,
        "model": ctx.model,
        "adapter": ctx.adapter,
        "variant": ctx.variant,
        "backend": ctx.backend if ctx.generation else None,
        "replica": ctx.replica,
        "key": ctx.key_name,
        "prompt_tokens": ctx.prompt_tokens if ctx.generation else None,
        "completion_tokens": ctx.completion_tokens if ctx.generation else None,
        "ttft_s": None if ctx.ttft is None else round(ctx.ttft, 6),
        "total_s": None if ctx.total is None else round(ctx.total, 6),
        "finish_reason": reasons,
        "client_disconnected": ctx.client_disconnected,
        "error_type": ctx.error_type,
    }


class AccessObserver:
    """See the module docstring. ``backend`` is the configured backend's name (the ``backend`` label)."""

    def __init__(self, app: ASGIApp, *, backend: str) -> None:
        self.app = app
        self.backend = backend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics: Metrics | None = getattr(scope["app"].state, "metrics", None) if "app" in scope else None
        ctx = RequestContext(request_id=scope.get("state", {}).get("request_id", ""), method=scope["method"],
                             path=scope["path"], backend=self.backend)
        if metrics is not None:
            ctx.on_submitted, ctx.on_first_output = metrics.request_started, metrics.first_output
        completed = False

        async def observed_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not completed:
                ctx.client_disconnected = True
            return message

        async def observed_send(message: Message) -> None:
            nonlocal completed
            if message["type"] == "http.response.start":
                ctx.status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                completed = True
            try:
                await send(message)
            except OSError:  # uvicorn's ClientDisconnected: the client went away mid-answer
                ctx.client_disconnected = True
                raise

        token = activate(ctx)
        try:
            await self.app(scope, observed_receive, observed_send)
        except BaseException:
            if ctx.status is None:
                ctx.status = 500  # the boundary outside renders it
                ctx.error_type = ctx.error_type or "server_error"
            raise
        finally:
            deactivate(token)
            if not completed and ctx.status is not None and ctx.status < 400 and ctx.generation:
                ctx.client_disconnected = True  # the body never ended: the client hung up (or the server stops)
            ctx.finish()
            if metrics is not None:
                metrics.request_ended(ctx)
            level = logging.DEBUG if ctx.path in QUIET_PATHS else logging.INFO
            if access_log.isEnabledFor(level):
                access_log.log(level, json.dumps(access_record(ctx)))
            try:
                await ctx.finish_async()
            except Exception:  # a limit store that is down must not turn a served answer into an error
                log.exception("request %s: end-of-request accounting failed", ctx.request_id)
