"""Turning an upstream's error answer into one of our errors.

The engines we sit in front of answer errors in three shapes, all handled by ``error_message``:

* OpenAI / current vLLM: ``{"error": {"message": ..., "type": ..., "param": ..., "code": 400}}``
* older vLLM and LMDeploy (flat): ``{"object": "error", "message": ..., "type": ..., "code": 400}``
* Ollama: ``{"error": "message"}``; FastAPI's defaults: ``{"detail": "Not Found"}`` or a list of problems.

The HTTP status decides the class (``error_for_status``); a body's integer ``code`` is used where no status is
meaningful, i.e. for an error event inside a stream that already answered 200.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import (
    AdapterLoadError,
    BackendUnavailable,
    Conflict,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    UpstreamError,
)


def error_message(payload: Any) -> str:
    """The human message of an error body (already decoded JSON), or its compact JSON when it has none."""
    if isinstance(payload, dict):
        inner = payload.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
        if isinstance(inner, str):
            return inner
        if isinstance(payload.get("message"), str):
            return payload["message"]
        detail = payload.get("detail")
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list) and detail:
            first = detail[0]
            if isinstance(first, dict):
                loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
                return f"{loc}: {first.get('msg', '')}" if loc else str(first.get("msg", ""))
    return json.dumps(payload, ensure_ascii=False)[:500]


def error_code(payload: Any) -> int | None:
    """The integer ``code`` an error body carries (nested or flat), if any."""
    if isinstance(payload, dict):
        inner = payload.get("error")
        for holder in (inner, payload):
            if isinstance(holder, dict) and isinstance(holder.get("code"), int):
                return int(holder["code"])
    return None


def error_for_status(status: int, message: str, *, adapter: bool = False) -> GatewayError:
    """Our error for an upstream status. ``adapter=True`` for adapter load calls, where 400/404 mean the
    adapter files are wrong rather than the request."""
    text = f"upstream: {message}"
    if adapter and status in (400, 404, 422):
        return AdapterLoadError(text)
    if status == 404:
        return ModelNotFound(text)
    if status in (400, 413, 422):
        return InvalidRequest(text)
    if status == 409:
        return Conflict(text)
    if status == 429:
        return Overloaded(text)
    if status == 503:
        return BackendUnavailable(text)
    # 401/403 mean the gateway's own upstream credentials are wrong: not the client's fault.
    return UpstreamError(text)


def decode_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body[:500].decode("utf-8", "replace")


def map_error_response(status: int, body: bytes) -> GatewayError:
    """``ErrorMapper`` for inference calls."""
    payload = decode_body(body)
    return error_for_status(status, error_message(payload) if not isinstance(payload, str) else payload)


def map_adapter_error_response(status: int, body: bytes) -> GatewayError:
    """``ErrorMapper`` for adapter load/unload calls."""
    payload = decode_body(body)
    message = error_message(payload) if not isinstance(payload, str) else payload
    return error_for_status(status, message, adapter=True)


def error_from_event(payload: dict[str, Any]) -> GatewayError:
    """Our error for an error object that arrived inside a stream (status already 200)."""
    code = error_code(payload)
    return error_for_status(code if code is not None and code >= 400 else 500, error_message(payload))
