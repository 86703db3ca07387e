"""A scriptable in-process backend and an app client for API tests (``httpx.ASGITransport``, lifespan run)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from backends.base import Capabilities, Delta, GenerationRequest, Health
from gateway.app import create_app
from gateway.settings import Settings


class FakeBackend:
    """The API tests' test double (STYLE #4): a backend with nothing to load and nothing to close. Subclasses script
    ``generate`` (and record what they were sent)."""

    capabilities = Capabilities(runtime_adapters=True)

    async def load_adapter(self, name: str, path: str) -> None:
        return None

    async def unload_adapter(self, name: str) -> None:
        return None

    async def health(self) -> Health:
        return Health(ok=True, detail="fake")

    async def aclose(self) -> None:
        return None


class ScriptedBackend(FakeBackend):
    """Answers every request with ``tokens`` (cut at ``max_tokens``: finish ``length``, else ``stop``).

    ``hold``: when set, every generation waits for it before its first token; ``arrived`` counts requests that
    reached the backend (so a test knows one is being held).
    """

    capabilities = Capabilities(runtime_adapters=True, max_context=512)

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.hold: asyncio.Event | None = None
        self.arrived = 0
        self.loaded: dict[str, str] = {}
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self.arrived += 1
        self.requests.append(request)
        if self.hold is not None:
            await self.hold.wait()
        budget = request.sampling.max_tokens
        out = self.tokens[:budget]
        for token in out[:-1]:
            yield Delta(token_ids=(token,))
            await asyncio.sleep(0)
        reason = "length" if len(self.tokens) > budget else "stop"
        yield Delta(token_ids=(out[-1],), finish_reason=reason, completion_tokens=len(out))

    async def load_adapter(self, name: str, path: str) -> None:
        self.loaded[name] = path

    async def unload_adapter(self, name: str) -> None:
        self.loaded.pop(name, None)



@asynccontextmanager
async def app_client(settings: Settings, backend: Any, **headers: str) -> AsyncIterator[httpx.AsyncClient]:
    """An ``httpx.AsyncClient`` on ``create_app(settings, backend=backend)`` with its lifespan running."""
    app = create_app(settings, backend=backend)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", headers=headers,
                                     timeout=30) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


async def chat_content(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    """The answer's content for the chat request ``body``; a streamed one is joined from its SSE chunks."""
    if not body.get("stream"):
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["message"]["content"])
    text = ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
    return text
