"""A fake of LMDeploy's api_server (``lmdeploy serve api_server``), written from its documented HTTP protocol.

Mirrors what the gateway relies on: ``/v1/models`` (base first, then adapter names; ``root`` = id, no parent),
``/health``, and ``/v1/completions`` with LMDeploy's request fields and defaults (``top_k`` 40,
``skip_special_tokens`` true, ``prompt`` a string or a list of prompts), its checks (unknown model -> 404,
``top_p`` outside (0, 1], ``top_k`` < 0, ``temperature`` outside [0, 2] -> 400; wrong types -> FastAPI 422), its
flat error body ``{"message", "type", "code", "param", "object": "error"}``, and its SSE framing
(``data: {...}\\n\\n``, per-chunk ``usage: null`` with include_usage, a usage chunk with ``choices: []``,
``data: [DONE]``). "Generation" plays back a fixed answer per model, one word per token.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from tests.backends.fakes.recording import DroppedConnection, Recorded, Recorder, apply_stop, pieces_of, tracked


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class CompletionRequest(BaseModel):
    model: str
    prompt: str | list[Any]
    temperature: float | None = 0.7
    n: int | None = 1
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    top_p: float | None = 1.0
    echo: bool | None = False
    repetition_penalty: float | None = 1.0
    session_id: int | None = -1
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    top_k: int | None = 40
    seed: int | None = None


def error(status: int, message: str, type_: str = "invalid_request_error") -> JSONResponse:
    body = {"message": message, "type": type_, "code": status, "param": None, "object": "error"}
    return JSONResponse(body, status_code=status)


def create_app(base: str, answers: dict[str, str], recorder: Recorder) -> FastAPI:
    """``answers`` maps every served model name (base and adapters) to the text it "generates"."""
    app = FastAPI()
    adapters = [name for name in answers if name != base]

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=recorder.faults.health_status)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cards = [
            {
                "id": name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "lmdeploy",
                "root": name,
                "parent": None,
                "permission": [],
            }
            for name in [base, *adapters]
        ]
        return {"object": "list", "data": cards}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw: Request) -> Any:
        recorder.requests.append(Recorded("POST", "/v1/completions", await raw.json(), dict(raw.headers)))
        faults = recorder.faults
        if request.model not in answers:
            return error(404, f"The model {request.model!r} does not exist.", "not_found_error")
        if request.top_p is not None and not (0 < request.top_p <= 1):
            return error(400, f"The top_p {request.top_p!r} must be in (0, 1].")
        if request.top_k is not None and request.top_k < 0:
            return error(400, f"The top_k {request.top_k!r} cannot be a negative integer.")
        if request.temperature is not None and not (0 <= request.temperature <= 2):
            return error(400, f"The temperature {request.temperature!r} must be in [0, 2]")
        if faults.status is not None:
            return error(faults.status, "engine failure injected by the test", "server_error")
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        prompt = request.prompt if isinstance(request.prompt, str) else json.dumps(request.prompt)
        out, finish = apply_stop(pieces_of(answers[request.model]), request.max_tokens or 16, stop)
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(out)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if not request.stream:
            choice = {"index": 0, "text": "".join(out), "logprobs": None, "gen_tokens": None, "finish_reason": finish}
            return {
                "id": "1",
                "object": "text_completion",
                "created": int(time.time()),
                "model": request.model,
                "choices": [choice],
                "usage": usage,
            }
        include_usage = bool(request.stream_options and request.stream_options.include_usage)

        async def stream() -> AsyncIterator[str]:
            await asyncio.sleep(faults.delay_first)
            for i, piece in enumerate(out):
                if faults.drop_after is not None and i == faults.drop_after:
                    raise DroppedConnection
                if faults.error_after is not None and i == faults.error_after:
                    err = {
                        "message": "engine failed mid-stream",
                        "type": "server_error",
                        "code": 500,
                        "param": None,
                        "object": "error",
                    }
                    yield f"data: {json.dumps(err)}\n\n"
                    return
                last = i == len(out) - 1
                chunk: dict[str, Any] = {
                    "id": "1",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": request.model,
                    "choices": [{"index": 0, "text": piece, **({"finish_reason": finish} if last else {})}],
                }
                if include_usage:
                    chunk["usage"] = None
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(faults.delay_each)
            if not out:
                chunk = {
                    "id": "1",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": request.model,
                    "choices": [{"index": 0, "text": "", "finish_reason": finish}],
                }
                yield f"data: {json.dumps(chunk)}\n\n"
            if include_usage:
                final = {
                    "id": "1",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": request.model,
                    "choices": [],
                    "usage": usage,
                }
                yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(tracked(recorder, stream()), media_type="text/event-stream")

    return app
