"""Every error the gateway raises, and the one place that turns them into OpenAI error bodies.

    GatewayError                    500  server_error
    ├── InvalidRequest              400  invalid_request_error   (bad JSON, wrong types, prompt too long, ...)
    ├── AuthenticationError         401  authentication_error
    ├── ModelNotFound               404  invalid_request_error   code=model_not_found
    ├── NotFound                    404  invalid_request_error
    ├── Conflict                    409  invalid_request_error
    ├── PayloadTooLarge             413  invalid_request_error   code=request_too_large (--max-body-bytes)
    ├── AdapterLoadError            422  invalid_request_error   (adapter does not fit its base, unsafe file, ...)
    ├── ClientDisconnected          499  client_closed_request   (nobody reads it: the client is gone)
    ├── Overloaded                  429  rate_limit_error        (queue full; carries Retry-After)
    ├── UpstreamError               502  upstream_error          (an upstream answered something broken)
    └── BackendUnavailable          503  service_unavailable     (no healthy upstream, engine stopped)

Backends translate foreign exceptions at their edge (``raise UpstreamError(...) from exc``); routes never
return error values and nothing matches on exception text.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from gateway.request_context import current_request


class GatewayError(Exception):
    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(GatewayError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class NotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class Conflict(GatewayError):
    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class AdapterLoadError(GatewayError):
    status_code = 422
    error_type = "invalid_request_error"
    default_code = "adapter_load_error"


class ClientDisconnected(GatewayError):
    status_code = 499  # nginx's "client closed request"; never seen by a client
    error_type = "client_closed_request"


class Overloaded(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class UpstreamError(GatewayError):
    status_code = 502
    error_type = "upstream_error"
    default_code = "bad_gateway"


class BackendUnavailable(GatewayError):
    status_code = 503
    error_type = "service_unavailable"
    default_code = "backend_unavailable"


class ErrorJSONResponse(JSONResponse):
    """JSON that always renders: a message quoting a lone surrogate the client sent falls back to ASCII escapes."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def note_error(exc: GatewayError) -> None:
    """Tell the request's context (metrics, access log) which error ended it."""
    ctx = current_request()
    if ctx is not None:
        ctx.error_type = exc.error_type


def error_response(exc: GatewayError) -> JSONResponse:
    note_error(exc)
    return ErrorJSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers())


# Routing and protocol errors Starlette raises, by status: the ``code`` our body gives them.
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request: " + str(first.get("msg", "")), None
    message = str(first.get("msg", "Invalid request."))
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    """Render every error — ours, validation, routing — as an OpenAI error body."""

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation_error(exc)
        return error_response(InvalidRequest(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = GatewayError(str(exc.detail), code=_HTTP_CODES.get(exc.status_code))
        error.status_code = exc.status_code
        error.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        response = error_response(error)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # Starlette's Allow names the first route of the path only: name them all
            response.headers["Allow"] = ", ".join(_allowed_methods(request))
        return response


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route fully matches for this path (routers included in the app answer for theirs)."""
    routes = request.app.router.routes
    return [method for method in _METHODS
            if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)]
