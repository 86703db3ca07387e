"""The OpenAPI document as the server really answers: OpenAI error bodies with the statuses each route can give.

FastAPI documents every error as 422 ``HTTPValidationError``; the gateway answers validation errors with 400 and
the OpenAI error body (``gateway.errors``), and a route can also give 401, 404, 409, 413, 422, 429, 500, 502 or
503. ``install_openapi`` replaces FastAPI's guess by those statuses, all with the ``ErrorResponse`` component, and
documents the success bodies FastAPI cannot see (completions return a model or an event stream). The ``model``
property of request bodies lists the names served when the document is built as ``examples``, so generated
clients and schema-based fuzzers start from real models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from gateway.protocol.chat import ChatCompletion
from gateway.protocol.completions import Completion

_DESCRIPTIONS = {
    400: "Invalid request: malformed JSON, a wrong type or value, a prompt over the context (OpenAI error body).",
    401: "Missing or wrong API key (or admin key).",
    404: "No such model, adapter or route.",
    405: "Method not allowed (the `Allow` header lists the methods).",
    409: "Conflict with the current state (an adapter in use, a name taken).",
    413: "The request body is over --max-body-bytes.",
    422: "The adapter cannot be loaded (not a LoRA folder, unsafe or misfit weights, outside the roots).",
    429: "Overloaded: the queue or every adapter slot is busy; see `Retry-After`.",
    500: "Unexpected server error; the message carries the request id.",
    502: "The upstream inference server answered something broken.",
    503: "No backend can serve now (no healthy upstream, engine stopped).",
}
_COMMON = (400, 401, 413, 500)
_GENERATION = (*_COMMON, 404, 422, 429, 502, 503)
_ADMIN_LOAD = (*_COMMON, 404, 409, 422, 429, 502, 503)
_ADMIN_UNLOAD = (*_COMMON, 404, 409, 502, 503)
_STATUSES: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/v1/chat/completions"): _GENERATION,
    ("post", "/v1/completions"): _GENERATION,
    ("post", "/v1/chat/render"): (*_COMMON, 404, 422),
    ("get", "/v1/models"): (401, 500),
    ("get", "/v1/models/{model_id}"): (400, 401, 404, 500),
    ("get", "/v1/adapters"): (401, 500),
    ("post", "/v1/adapters"): _ADMIN_LOAD,
    ("post", "/v1/load_lora_adapter"): _ADMIN_LOAD,
    ("delete", "/v1/adapters/{name}"): _ADMIN_UNLOAD,
    ("post", "/v1/unload_lora_adapter"): _ADMIN_UNLOAD,
    ("get", "/health"): (500,),
}
_SUCCESS: dict[tuple[str, str], type[BaseModel]] = {
    ("post", "/v1/chat/completions"): ChatCompletion,
    ("post", "/v1/completions"): Completion,
}
_EVENT_STREAM = {"text/event-stream": {"schema": {  # one server-sent event
    "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "description": "With `stream: true`: `data: {chunk JSON}` events, then `data: [DONE]`; a failure mid-way is a "
                   "`data: {error body}` event before `[DONE]`."}}}


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error, server_error, ...")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str | None = Field(description="A machine-readable reason, e.g. model_not_found, context_length_exceeded.")


class ErrorResponse(BaseModel):
    """The OpenAI error body every error of the gateway has."""

    error: ErrorDetail


def _add_models(schema: dict[str, Any], *models: type[BaseModel]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        generated = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        components.update(generated.pop("$defs", {}))
        components[model.__name__] = generated


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}


def build_openapi(app: FastAPI, served_models: list[str]) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    _add_models(schema, ErrorResponse, *_SUCCESS.values())
    components = schema["components"]["schemas"]
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)  # FastAPI's HTTPValidationError: never sent
            for status in _STATUSES.get((method, path), (*_COMMON, 404)):
                responses[str(status)] = {"description": _DESCRIPTIONS[status], "content": _ref(ErrorResponse)}
            if (method, path) == ("get", "/health"):
                responses["503"] = {"description": "The backend cannot serve now (same body, status unavailable).",
                                    "content": {"application/json": {"schema": {"type": "object"}}}}
            success = _SUCCESS.get((method, path))
            if success is not None:
                responses["200"]["content"] = {**_ref(success), **_EVENT_STREAM}
    if served_models:
        for body in ("ChatCompletionRequest", "CompletionRequest"):
            model_property = components.get(body, {}).get("properties", {}).get("model")
            if model_property is not None:
                model_property["examples"] = served_models
    return schema


def install_openapi(app: FastAPI, served_models: Callable[[], list[str]]) -> None:
    """Serve ``build_openapi`` at ``/openapi.json`` (built on first use, after start-up, then kept)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, served_models())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema
