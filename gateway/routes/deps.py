"""Dependencies shared by routes: the running state and the optional API key check."""

from __future__ import annotations

import secrets

from fastapi import Request

from gateway.errors import AuthenticationError
from gateway.state import GatewayState


def gateway_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


def require_api_key(request: Request) -> None:
    expected = gateway_state(request).settings.api_key
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), expected):
        raise AuthenticationError("Incorrect or missing API key: send `Authorization: Bearer <key>`.")
