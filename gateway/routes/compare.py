"""``POST /v1/compare``: one chat request to several models (or, blind, to two anonymous ones) at once."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from gateway.experiments.compare import compare, compare_stream, contestants
from gateway.generation import note_unknown_fields
from gateway.protocol.experiments import CompareRequest, CompareResponse
from gateway.routes.deps import gateway_state, require_api_key
from gateway.sse import sse_response
from gateway.state import GatewayState

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/compare", response_model=None)
async def create_comparison(body: CompareRequest, request: Request,
                            state: GatewayState = Depends(gateway_state)) -> CompareResponse | Any:
    """Unknown models answer 404 before anything runs; a model that fails while running gets its own ``error``.
    With ``stream``: SSE events ``{"model", "index", "chunk"}`` then one ``{"model", "index", "result"}`` per model,
    then ``[DONE]``."""
    note_unknown_fields(state, body)
    chosen = contestants(state, body, request)
    if body.stream:
        return sse_response(compare_stream(state, body, chosen))
    return await compare(state, body, chosen)
