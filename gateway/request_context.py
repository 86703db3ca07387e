"""What the gateway learns about one request while serving it, for its metrics and its access-log line.

``gateway.access.AccessObserver`` creates one ``RequestContext`` per HTTP request and makes it current (a
context variable: one value per request task, no shared state); it reads it back when the response has ended.
Code along the request's way fills in what it knows:

- auth (``gateway.routes.deps``): ``key_name``;
- a route that picks what serves the request fills ``model`` (the name the client used: base, adapter or route)
  and ``variant`` (the A/B variant a route resolved to) **before** the adapter lease; the generation code fills
  ``adapter`` and, when nothing set it yet, ``model`` (the target's name)::

      from gateway.request_context import current_request

      ctx = current_request()
      if ctx is not None:
          ctx.model, ctx.variant = route.name, variant.name

- the generation stream observer (``gateway.generation``): token counts, first-token and per-token times,
  finish reasons; an upstream pool: the ``replica`` that answered; the native engine: ``engine_queue_seconds``.

Tasks spawned inside the request (``n > 1`` choice pumps) copy the context, so they update the same object.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class RequestContext:
    """One request as the gateway saw it. Times are ``time.perf_counter()`` values."""

    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    key_name: str | None = None
    model: str | None = None
    adapter: str | None = None
    variant: str | None = None
    backend: str | None = None
    replica: str | None = None
    generation: bool = False  # a completion was attempted (the request counts in the inference metrics)
    submitted: float | None = None  # handed to the backend
    first_token: float | None = None
    last_token: float | None = None
    token_gaps: list[float] = field(default_factory=list)  # seconds between consecutive output pieces
    engine_queue_seconds: float | None = None  # time a native-engine sequence waited for a batch slot
    prompt_tokens: int = 0
    completion_tokens: int = 0
    max_tokens: int | None = None
    finish_reasons: list[str] = field(default_factory=list)
    status: int | None = None
    error_type: str | None = None  # the OpenAI error type of a failed request (or of a stream's error event)
    client_disconnected: bool = False
    ended: float | None = None
    on_submitted: Callable[[RequestContext], None] | None = None  # metrics hooks (gateway.observe sets them)
    on_first_output: Callable[[RequestContext], None] | None = None
    _on_end: list[Callable[[RequestContext], None]] = field(default_factory=list)
    _on_async_end: list[Callable[[RequestContext], Awaitable[None]]] = field(default_factory=list)

    # --- called from the generation flow (cheap: once per output piece at most) --------------------------------

    def generation_started(self, *, prompt_tokens: int, max_tokens: int, model: str, adapter: str | None) -> None:
        """The request is handed to the backend (once, whatever ``n``)."""
        self.generation = True
        if self.submitted is not None:
            return
        self.submitted = time.perf_counter()
        self.prompt_tokens, self.max_tokens = prompt_tokens, max_tokens
        self.model = self.model or model
        self.adapter = adapter
        if self.on_submitted is not None:
            self.on_submitted(self)

    def output(self, tokens: int) -> None:
        """One piece of output with ``tokens`` tokens (at least 1) arrived."""
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
            if self.on_first_output is not None:
                self.on_first_output(self)
        elif self.last_token is not None:
            self.token_gaps.append(now - self.last_token)
        self.last_token = now
        self.completion_tokens += tokens

    def finished(self, reason: str, counted: int, reported: int | None) -> None:
        """A choice finished; ``reported`` (the backend's own count, if any) replaces the ``counted`` tokens."""
        self.finish_reasons.append(reason)
        if reported is not None:
            self.completion_tokens += reported - counted

    def on_end(self, callback: Callable[[RequestContext], None]) -> None:
        """Run ``callback(self)`` once the response has ended (limits give back slots and count tokens here)."""
        self._on_end.append(callback)

    def on_async_end(self, callback: Callable[[RequestContext], Awaitable[None]]) -> None:
        """Like ``on_end`` for a coroutine (a limit store that is a network service): awaited after ``finish``."""
        self._on_async_end.append(callback)

    async def finish_async(self) -> None:
        callbacks, self._on_async_end = self._on_async_end, []
        for callback in callbacks:
            await callback(self)

    def finish(self) -> None:
        """Mark the end and run the ``on_end`` callbacks (each once)."""
        if self.ended is None:
            self.ended = time.perf_counter()
        callbacks, self._on_end = self._on_end, []
        for callback in callbacks:
            callback(self)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @property
    def total(self) -> float | None:
        return None if self.ended is None else self.ended - self.started

    @property
    def queue_seconds(self) -> float | None:
        """From arrival until the backend took the request, plus the engine's own queue when it reports one."""
        if self.submitted is None:
            return None
        return self.submitted - self.started + (self.engine_queue_seconds or 0.0)


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("request_context", default=None)


def current_request() -> RequestContext | None:
    """The context of the request being served in this task, or ``None`` outside a request."""
    return _current.get()


def activate(ctx: RequestContext) -> contextvars.Token[RequestContext | None]:
    return _current.set(ctx)


def deactivate(token: contextvars.Token[RequestContext | None]) -> None:
    _current.reset(token)
