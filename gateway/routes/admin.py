"""Health: ``GET /health`` answers 200 while the backend can serve, 503 otherwise."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from gateway.routes.deps import gateway_state
from gateway.state import GatewayState

router = APIRouter()


@router.get("/health")
async def health(state: GatewayState = Depends(gateway_state)) -> JSONResponse:
    status = await state.backend.health()
    body = {
        "status": "ok" if status.ok else "unavailable",
        "backend": state.settings.backend,
        "detail": status.detail,
        "models": len(list(state.registry)),
        **status.extra,
    }
    return JSONResponse(body, status_code=200 if status.ok else 503)
