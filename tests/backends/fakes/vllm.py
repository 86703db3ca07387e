"""A fake vLLM OpenAI server (0.32's protocol) with runtime LoRA updating and a GPU budget of ``max_loras`` slots.

What it does like vLLM:

* ``/v1/models``: the base (``parent: null``) and every LoRA, those loaded at runtime included (``parent`` = base,
  ``root`` = the path it was loaded from).
* ``POST /v1/load_lora_adapter`` (400 when the name is loaded already, 404 when the path is not on its "disk"),
  ``POST /v1/unload_lora_adapter`` (404 when unknown).
* Streaming ``/v1/completions`` with ``prompt`` as token ids, ``return_token_ids``; a ``model`` it does not serve
  answers 404 ``NotFoundError`` "The model `x` does not exist." (what a restarted vLLM answers for a LoRA it forgot).
* LoRA slots: at most ``max_loras`` adapters active at once, kept as an LRU; a request whose adapter is not active
  activates it (a *miss*, costing ``load_delay`` seconds), evicting the least recently used adapter without running
  requests, or waits while every slot has running requests.
* ``/metrics``: ``vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}`` with the time
  as its value.

A restart is a new ``FakeVLLM`` on the same port: everything loaded at runtime is gone.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from tests.backends.fakes.recording import Recorded, Recorder, tracked


def error(status: int, message: str, type_: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": status}}, status)


@dataclass
class FakeVLLM:
    base: str = "tiny"
    disk: frozenset[str] = frozenset()  # adapter paths that exist for this server
    max_loras: int = 1
    tokens: int = 4
    delay_each: float = 0.0
    load_delay: float = 0.0
    recorder: Recorder = field(default_factory=Recorder)
    loras: dict[str, str] = field(default_factory=dict)  # name -> path (runtime-loaded)
    slots: OrderedDict[str, None] = field(default_factory=OrderedDict)  # active adapters, least recent first
    running: Counter[str] = field(default_factory=Counter)
    waiting: Counter[str] = field(default_factory=Counter)
    hits: int = 0
    misses: int = 0
    served: Counter[str] = field(default_factory=Counter)  # completions per model

    async def activate(self, lora: str, changed: asyncio.Condition) -> None:
        async with changed:
            if lora in self.slots:
                self.hits += 1
                self.slots.move_to_end(lora)
                return
            self.misses += 1
            self.waiting[lora] += 1
            try:
                while len(self.slots) >= self.max_loras:
                    idle = [name for name in self.slots if not self.running[name]]
                    if idle:
                        del self.slots[idle[0]]
                        break
                    await changed.wait()
                self.slots[lora] = None
            finally:
                self.waiting[lora] -= 1
                if not self.waiting[lora]:
                    del self.waiting[lora]
        await asyncio.sleep(self.load_delay)

    def app(self) -> FastAPI:
        app = FastAPI()
        changed = asyncio.Condition()

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=self.recorder.faults.health_status)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            data = [{"id": self.base, "object": "model", "owned_by": "vllm", "root": f"/models/{self.base}",
                     "parent": None}]
            data += [{"id": name, "object": "model", "owned_by": "vllm", "root": path, "parent": self.base}
                     for name, path in self.loras.items()]
            return {"object": "list", "data": data}

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            labels = (f'max_lora="{self.max_loras}",running_lora_adapters="{",".join(sorted(self.running))}",'
                      f'waiting_lora_adapters="{",".join(sorted(self.waiting))}"')
            text = ("# HELP vllm:lora_requests_info Running stats on lora requests.\n"
                    "# TYPE vllm:lora_requests_info gauge\n"
                    f"vllm:lora_requests_info{{{labels}}} {time.time()}\n")
            return PlainTextResponse(text)

        @app.post("/v1/load_lora_adapter")
        async def load(raw: Request) -> Response:
            body = await raw.json()
            self.recorder.requests.append(Recorded("POST", "/v1/load_lora_adapter", body))
            name, path = body.get("lora_name"), body.get("lora_path")
            if name in self.loras:
                return error(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
            if path not in self.disk:
                return error(404, f"No adapter found for {path}", "NotFoundError")
            self.loras[name] = path
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload(raw: Request) -> Response:
            body = await raw.json()
            self.recorder.requests.append(Recorded("POST", "/v1/unload_lora_adapter", body))
            if self.loras.pop(body.get("lora_name"), None) is None:
                return error(404, f"The lora adapter '{body.get('lora_name')}' cannot be found.", "NotFoundError")
            self.slots.pop(body["lora_name"], None)
            return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")

        @app.post("/v1/completions")
        async def completions(raw: Request) -> Response:
            body = await raw.json()
            self.recorder.requests.append(Recorded("POST", "/v1/completions", body))
            model = body.get("model")
            if model != self.base and model not in self.loras:
                return error(404, f"The model `{model}` does not exist.", "NotFoundError")
            ids = body.get("prompt")
            if not isinstance(ids, list) or not ids:
                return error(400, "this fake takes token id prompts", "BadRequestError")
            lora = model if model != self.base else None
            if lora is not None:
                await self.activate(lora, changed)
                self.running[lora] += 1
            self.served[model] += 1
            count = min(int(body.get("max_tokens") or 16), self.tokens)

            async def stream() -> AsyncIterator[str]:
                try:
                    for i in range(count):
                        choice: dict[str, Any] = {"index": 0, "text": f" t{i}", "token_ids": [100 + i],
                                                  "finish_reason": "length" if i == count - 1 else None}
                        if i == 0:
                            choice["prompt_token_ids"] = ids
                        event = {"object": "text_completion", "model": model, "choices": [choice]}
                        yield f"data: {json.dumps(event)}\n\n"
                        await asyncio.sleep(self.delay_each)
                    usage = {"prompt_tokens": len(ids), "completion_tokens": count, "total_tokens": len(ids) + count}
                    yield f"data: {json.dumps({'object': 'text_completion', 'choices': [], 'usage': usage})}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    if lora is not None:
                        self.running[lora] -= 1
                        if not self.running[lora]:
                            del self.running[lora]
                        async with changed:
                            changed.notify_all()

            return StreamingResponse(tracked(self.recorder, stream()), media_type="text/event-stream")

        return app
