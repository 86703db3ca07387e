"""``create_app(settings)``: the FastAPI application. Its lifespan builds the backend and registry."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from backends.base import Backend
from gateway import __version__
from gateway.boundary import BodyLimit, RequestBoundary
from gateway.errors import install_error_handlers
from gateway.loading import build_state
from gateway.openapi import install_openapi
from gateway.routes import adapters, admin, chat, compare, completions, feedback, models, pages, routes
from gateway.settings import Settings


def create_app(settings: Settings, *, backend: Backend | None = None) -> FastAPI:
    """The gateway app. ``backend`` replaces the configured one (tests pass a fake)."""

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
            await state.feedback.aclose()
            await state.backend.aclose()

    app = FastAPI(title="lora-gateway", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    install_openapi(app, lambda: [t.name for t in app.state.gateway.adapters.targets()]
                    if hasattr(app.state, "gateway") else [])
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestBoundary)  # added last: outermost, so it also sees the body limit's answers
    for module in (chat, completions, models, adapters, admin, compare, feedback, routes, pages):
        app.include_router(module.router)
    app.mount("/web", pages.static_files(), name="web")
    return app
