"""Dependencies shared by routes: the running state and the optional API key check."""

from __future__ import annotations

import secrets

from fastapi import Request

from gateway.errors import AuthenticationError
from gateway.state import GatewayState


# Both are ``async def`` although they never await: FastAPI runs a plain ``def`` dependency in its thread pool,
# a thread hop per request that costs more than the rest of the request's setup under load.
async def gateway_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


async def require_api_key(request: Request) -> None:
    state: GatewayState = request.app.state.gateway
    expected = state.settings.api_key
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise AuthenticationError("Incorrect or missing API key: send `Authorization: Bearer <key>`.")
