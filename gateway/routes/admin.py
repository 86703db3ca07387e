"""Probes and scrapes: ``GET /health`` (alive), ``GET /ready`` (can serve), ``GET /metrics`` (Prometheus).

- ``/health`` answers 200 while the process serves HTTP, also while it waits for an upstream or the backend is
  unhealthy (a liveness probe must not restart a gateway whose upstream is down); its body says how things are.
- ``/ready`` answers 200 when requests can be served, 503 otherwise (see ``gateway.readiness``).
- ``/metrics``: the exposition text (``gateway.metrics``); open unless ``--metrics-auth``.

``/health`` and ``/ready`` never need a key.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.readiness import readiness
from gateway.routes.deps import require_metrics_access
from gateway.state import GatewayState

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state: GatewayState | None = getattr(request.app.state, "gateway", None)
    if state is None:
        return JSONResponse({"status": "starting", "detail": request.app.state.not_ready,
                             "backend": request.app.state.settings.backend})
    status = await state.backend.health()
    body = {
        "status": "ok" if status.ok else "unavailable",
        "backend": state.settings.backend,
        "detail": status.detail,
        "models": len(list(state.registry)),
        **status.extra,
    }
    return JSONResponse(body)


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    ok, body = await readiness(request.app)
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", dependencies=[Depends(require_metrics_access)], response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    collectors: Metrics = request.app.state.metrics
    return Response(collectors.render(), media_type=CONTENT_TYPE)
