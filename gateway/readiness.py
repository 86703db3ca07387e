"""Start-up that waits for an upstream instead of exiting, and the readiness answer of ``GET /ready``.

``serve_state`` runs in the app's lifespan. Settings, tokenizer and templates are checked first (a wrong setting
still stops the process at once). Then the backend starts; when an upstream backend cannot be reached yet
(``BackendUnavailable``, or an ``UpstreamError`` from an upstream still loading), the server starts anyway —
``/health`` answers 200 (alive), ``/ready`` and every API route 503 — and a background task retries every
``--upstream-health-interval`` seconds (at least 1) until it succeeds, logging why each try failed.

Ready (``readiness``): the state is built (model loaded, configured adapters registered), every pinned adapter is
loaded, and the backend is healthy (for upstreams: at least one replica passed its last health check).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from backends.base import Backend
from gateway.errors import BackendUnavailable, UpstreamError
from gateway.loading import Prepared, connect, prepare
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.state import GatewayState

log = logging.getLogger(__name__)

RETRYABLE = (BackendUnavailable, UpstreamError)


def _install(app: FastAPI, state: GatewayState, metrics: Metrics) -> None:
    metrics.model_name = state.registry.base_name
    pool = state.adapters
    metrics.watch(adapter_rows=getattr(state.backend, "adapter_requests", None),
                  max_lora=lambda: pool.max_adapters or len(pool.catalog()))
    app.state.gateway = state
    app.state.not_ready = None


async def _keep_trying(app: FastAPI, prepared: Prepared, metrics: Metrics, interval: float) -> None:
    attempt = 1
    while True:
        await asyncio.sleep(interval)
        attempt += 1
        try:
            state = await connect(prepared, metrics=metrics)
        except Exception as exc:  # retried whatever it is: the upstream may be half up; the reason is logged
            app.state.not_ready = f"upstream not usable yet ({type(exc).__name__}: {exc})"
            log.warning("start-up attempt %d: %s; retrying in %g s", attempt, app.state.not_ready, interval)
            continue
        _install(app, state, metrics)
        log.info("upstream reachable after %d attempts: ready", attempt)
        return


@asynccontextmanager
async def serve_state(app: FastAPI, settings: Settings, backend: Backend | None, metrics: Metrics
                      ) -> AsyncIterator[None]:
    """The lifespan's body: ``app.state.gateway`` set once the backend is up (see the module docstring)."""
    app.state.not_ready = "starting"
    prepared = await prepare(settings)
    retry: asyncio.Task[None] | None = None
    try:
        _install(app, await connect(prepared, backend, metrics), metrics)
    except RETRYABLE as exc:
        if settings.backend == "torch" or backend is not None:
            raise
        interval = max(1.0, settings.upstream_health_interval)
        app.state.not_ready = f"upstream not reachable yet ({exc.message})"
        log.warning("%s; serving /health, /ready answers 503 until it is; retrying every %g s",
                    app.state.not_ready, interval)
        retry = asyncio.create_task(_keep_trying(app, prepared, metrics, interval), name="upstream-start")
    try:
        yield
    finally:
        if retry is not None:
            retry.cancel()
            await asyncio.gather(retry, return_exceptions=True)
        state: GatewayState | None = getattr(app.state, "gateway", None)
        if state is not None:
            await state.feedback.aclose()
            await state.backend.aclose()


async def readiness(app: FastAPI) -> tuple[bool, dict[str, Any]]:
    """(ready, body) for ``GET /ready``."""
    if app.state.lifecycle.draining:  # SIGTERM: finish what is in flight, take nothing new (gateway.lifecycle)
        return False, {"status": "draining", "detail": "shutting down: requests in flight are finishing"}
    state: GatewayState | None = getattr(app.state, "gateway", None)
    if state is None:
        return False, {"status": "not_ready", "detail": app.state.not_ready or "starting"}
    health = await state.backend.health()
    unloaded = sorted(name for name in state.adapters.pins
                      if next((a.state for a in state.adapters.catalog() if a.name == name), None) != "loaded")
    ready = health.ok and not unloaded
    detail = health.detail if not health.ok else (f"pinned adapters not loaded: {', '.join(unloaded)}"
                                                  if unloaded else "ready")
    return ready, {"status": "ready" if ready else "not_ready", "detail": detail, "backend": state.settings.backend,
                   "pinned_unloaded": unloaded}
