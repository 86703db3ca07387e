"""``create_app(settings)``: the FastAPI application. Its lifespan builds the backend and registry."""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from backends.base import Backend
from gateway import __version__
from gateway.boundary import BodyLimit, RequestBoundary
from gateway.errors import install_error_handlers
from gateway.lifecycle import SETTINGS_ENV, Lifecycle
from gateway.loading import build_state
from gateway.routes import adapters, admin, chat, completions, models, readiness
from gateway.settings import Settings


def create_app(settings: Settings, *, backend: Backend | None = None, lifecycle: Lifecycle | None = None) -> FastAPI:
    """The gateway app. ``backend`` replaces the configured one (tests pass a fake); ``lifecycle`` is the
    drain state the server flips on SIGTERM (``app.state.lifecycle``; a fresh one when not given)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await build_state(settings, backend)
        app.state.gateway = state
        # Everything built so far (torch, transformers, the model, the tokenizer) lives as long as the server: keep
        # it out of the cyclic collector's scans, which otherwise stall every request for milliseconds.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await state.backend.aclose()

    app = FastAPI(title="lora-gateway", version=__version__, lifespan=lifespan)
    app.state.lifecycle = lifecycle or Lifecycle()
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestBoundary)  # added last: outermost, so it also sees the body limit's answers
    for module in (chat, completions, models, adapters, admin, readiness):
        app.include_router(module.router)
    return app


def create_app_from_env() -> FastAPI:
    """The app of one ``--workers`` process (uvicorn's ``factory=True`` import string), with the settings that
    ``gateway serve`` put in ``SETTINGS_ENV`` as JSON (already validated there)."""
    return create_app(Settings.model_validate_json(os.environ[SETTINGS_ENV]))
