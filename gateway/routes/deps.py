"""Dependencies shared by the routes: the app's state, the API key check, and per-key admission."""

from __future__ import annotations

from fastapi import Request

from gateway.admission import KeyLimits
from gateway.errors import AuthenticationError, BackendUnavailable
from gateway.keys import KeyRing, bearer_token
from gateway.request_context import current_request
from gateway.state import GatewayState


# All are ``async def`` although most never await: FastAPI runs a plain ``def`` dependency in its thread pool,
# a thread hop per request that costs more than the rest of the request's setup under load.
async def gateway_state(request: Request) -> GatewayState:
    state: GatewayState | None = getattr(request.app.state, "gateway", None)
    if state is None:  # the lifespan is still waiting for an upstream (see gateway.readiness)
        detail = getattr(request.app.state, "not_ready", "starting")
        raise BackendUnavailable(f"The gateway is not ready yet: {detail}. Retry shortly (GET /ready says when).",
                                 code="not_ready")
    return state


def _keys(request: Request) -> KeyRing:
    keys: KeyRing = request.app.state.keys
    return keys


async def require_api_key(request: Request) -> None:
    """With client keys configured: ``Authorization: Bearer <key>`` must be one of them (401 otherwise). The key's
    name goes to the request's context (access log, per-key metrics and limits)."""
    keys = _keys(request)
    if not keys.enabled:
        return
    token = bearer_token(request.headers.get("authorization", ""))
    key = keys.match(token) if token is not None else None
    if key is None:
        raise AuthenticationError("Incorrect or missing API key: send `Authorization: Bearer <key>`.")
    ctx = current_request()
    if ctx is not None:
        ctx.key_name = key.name


async def require_admin_key(request: Request) -> None:
    """The admin key when one is configured; otherwise the client key check applies."""
    keys = _keys(request)
    if not keys.has_admin:
        await require_api_key(request)
        return
    token = bearer_token(request.headers.get("authorization", ""))
    if token is None or not keys.is_admin(token):
        raise AuthenticationError("The adapter admin API needs `Authorization: Bearer <admin key>`.",
                                  code="invalid_admin_key")
    ctx = current_request()
    if ctx is not None:
        ctx.key_name = "admin"


async def require_metrics_access(request: Request) -> None:
    """``/metrics``: open unless ``--metrics-auth``; then the admin key or any client key."""
    if not request.app.state.settings.metrics_auth:
        return
    keys = _keys(request)
    token = bearer_token(request.headers.get("authorization", ""))
    if token is not None and (keys.is_admin(token) or keys.match(token) is not None):
        return
    if not keys.enabled and not keys.has_admin:
        return  # no key exists that could be asked for
    raise AuthenticationError("`/metrics` needs `Authorization: Bearer <key>` (--metrics-auth).")


async def admit_generation(request: Request) -> None:
    """Per-key limits for a generation request (429 with Retry-After when one is reached)."""
    limits: KeyLimits | None = request.app.state.limits
    ctx = current_request()
    if limits is not None and ctx is not None:
        await limits.admit(ctx)
