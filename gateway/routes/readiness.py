"""``GET /ready``: 200 while this process takes new requests, 503 once it drains (SIGTERM) or cannot serve.

``/health`` says the process is alive; ``/ready`` says a load balancer should send it traffic.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from gateway.lifecycle import Lifecycle
from gateway.routes.deps import gateway_state
from gateway.state import GatewayState

router = APIRouter()


@router.get("/ready")
async def ready(request: Request, state: GatewayState = Depends(gateway_state)) -> JSONResponse:
    lifecycle: Lifecycle = request.app.state.lifecycle
    if lifecycle.draining:
        return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "1"})
    health = await state.backend.health()
    return JSONResponse({"status": "ready" if health.ok else "unavailable", "detail": health.detail},
                        status_code=200 if health.ok else 503)
