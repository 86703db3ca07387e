"""``create_app(settings)``: the FastAPI application. Its lifespan builds the backend and registry."""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from backends.base import Backend
from gateway import __version__
from gateway.admission import KeyLimits
from gateway.boundary import REQUEST_ID_HEADER, BodyLimit, RequestBoundary
from gateway.errors import install_error_handlers
from gateway.keys import KeyRing
from gateway.lifecycle import SETTINGS_ENV, Lifecycle
from gateway.metrics import Metrics
from gateway.observe import AccessObserver
from gateway.openapi import install_openapi
from gateway.readiness import serve_state
from gateway.routes import adapters, admin, chat, compare, completions, feedback, models, pages, routes
from gateway.settings import Settings

DEFAULT_TOKEN_BUCKETS_UP_TO = 1_000_000  # token-count histograms when --max-model-len is not given


def create_app(settings: Settings, *, backend: Backend | None = None, lifecycle: Lifecycle | None = None) -> FastAPI:
    """The gateway app. ``backend`` replaces the configured one (tests pass a fake); ``lifecycle`` is the
    drain state the server flips on SIGTERM (``app.state.lifecycle``; a fresh one when not given). Raises
    ``SettingsError`` for unusable keys or limit storage."""

    metrics = Metrics(model_name=settings.served_model_name or "", backend=settings.backend,
                      max_model_len=settings.max_model_len or DEFAULT_TOKEN_BUCKETS_UP_TO)
    entries = [e for e in (settings.api_key, *settings.api_keys) if e]
    keys = KeyRing.from_settings(entries=entries, key_file=settings.api_key_file, admin_key=settings.admin_key)
    limits = KeyLimits.from_settings(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with serve_state(app, settings, backend, metrics):
            # Everything built so far (torch, transformers, the model, the tokenizer) lives as long as the server:
            # keep it out of the cyclic collector's scans, which otherwise stall every request for milliseconds.
            gc.collect()
            gc.freeze()
            yield

    app = FastAPI(title="lora-gateway", version=__version__, lifespan=lifespan)
    app.state.settings, app.state.metrics, app.state.keys, app.state.limits = settings, metrics, keys, limits
    app.state.lifecycle = lifecycle or Lifecycle()
    install_error_handlers(app)
    install_openapi(app, lambda: [t.name for t in app.state.gateway.adapters.targets()]
                    if hasattr(app.state, "gateway") else [])
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        # Off by default. Bearer keys travel in a header, so no credentials (cookies) are allowed.
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=[REQUEST_ID_HEADER], max_age=600)
    app.add_middleware(AccessObserver, backend=settings.backend)
    app.add_middleware(RequestBoundary)  # added last: outermost, so it also sees the body limit's answers
    for module in (chat, completions, models, adapters, admin, compare, feedback, routes, pages):
        app.include_router(module.router)
    app.mount("/web", pages.static_files(), name="web")
    return app


def create_app_from_env() -> FastAPI:
    """The app of one ``--workers`` process (uvicorn's ``factory=True`` import string), with the settings that
    ``gateway serve`` put in ``SETTINGS_ENV`` as JSON (already validated there)."""
    return create_app(Settings.model_validate_json(os.environ[SETTINGS_ENV]))
