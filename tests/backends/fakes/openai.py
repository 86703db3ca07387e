"""A fake OpenAI-compatible completions server (the protocol llama.cpp, SGLang, vLLM and OpenAI share).

``/v1/models``, ``/health`` and streaming ``/v1/completions``: ``prompt`` may be text or a list of token ids;
errors are OpenAI's nested ``{"error": {"message", "type", "param", "code"}}``; SSE chunks
``data: {...}\\n\\n``, a usage chunk with ``choices: []`` when ``stream_options.include_usage``, ``data: [DONE]``;
a mid-stream error is a ``data: {"error": {...}}`` event.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.backends.fakes.recording import DroppedConnection, Recorded, Recorder, apply_stop, pieces_of, tracked


def error(status: int, message: str, type_: str = "BadRequestError") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": status}}, status)


def create_app(answers: dict[str, str], recorder: Recorder, *, lora_parent: str | None = None) -> FastAPI:
    """``answers``: model name -> text. With ``lora_parent`` every other model is listed as a LoRA of it."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=recorder.faults.health_status)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = []
        for name in answers:
            parent = lora_parent if lora_parent and name != lora_parent else None
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "fake",
                    "root": f"/loras/{name}" if parent else name,
                    "parent": parent,
                }
            )
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Any:
        body = await raw.json()
        recorder.requests.append(Recorded("POST", "/v1/completions", body))
        faults = recorder.faults
        if body.get("model") not in answers:
            return error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        prompt = body.get("prompt")
        if not isinstance(prompt, (str, list)) or not prompt:
            return error(400, "prompt must be a non-empty string or list of token ids")
        if faults.status is not None:
            return error(faults.status, "engine failure injected by the test", "InternalServerError")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        out, finish = apply_stop(pieces_of(answers[body["model"]]), int(body.get("max_tokens") or 16), stop)
        usage = {
            "prompt_tokens": len(prompt) if isinstance(prompt, list) else len(prompt.split()),
            "completion_tokens": len(out),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(text: str, finish_reason: str | None) -> str:
            c = {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            }
            return f"data: {json.dumps(c)}\n\n"

        async def stream() -> AsyncIterator[str]:
            await asyncio.sleep(faults.delay_first)
            for i, piece in enumerate(out):
                if faults.drop_after is not None and i == faults.drop_after:
                    raise DroppedConnection
                if faults.error_after is not None and i == faults.error_after:
                    err = {
                        "error": {"message": "engine died", "type": "InternalServerError", "param": None, "code": 500}
                    }
                    yield f"data: {json.dumps(err)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                yield chunk(piece, None)
                await asyncio.sleep(faults.delay_each)
            yield chunk("", finish)
            if include_usage:
                u = {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [],
                    "usage": usage,
                }
                yield f"data: {json.dumps(u)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(tracked(recorder, stream()), media_type="text/event-stream")

    return app
