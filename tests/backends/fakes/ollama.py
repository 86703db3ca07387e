"""A fake of Ollama's HTTP API, written from its documentation (docs/api.md, docs/api/errors.mdx).

Covers what the gateway uses: ``GET /api/tags``; ``POST /api/generate`` with ``raw``, ``options``
(``num_predict``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``) answering NDJSON
(``application/x-ndjson``) lines ``{"model", "created_at", "response", "done": false}`` and a last line with
``done: true``, ``done_reason``, ``prompt_eval_count``, ``eval_count`` and durations; errors as
``{"error": "..."}`` (404 for an unknown model; mid-stream as an NDJSON line); ``HEAD``/``POST
/api/blobs/sha256:<digest>`` (the upload is checked against its digest, 201 Created); ``POST /api/create``
with ``{"model", "from", "adapters": {file: digest}, "stream"}``; ``DELETE /api/delete``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.backends.fakes.recording import DroppedConnection, Recorded, Recorder, apply_stop, pieces_of, tracked


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _tag(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def create_app(answers: dict[str, str], recorder: Recorder) -> FastAPI:
    """``answers`` maps the existing models to what they "generate"; models made by ``/api/create`` answer
    ``"<answer of from> + <adapter digest prefix>"`` so a test can tell which adapter they were built from."""
    app = FastAPI()
    models: dict[str, str] = {_tag(k): v for k, v in answers.items()}
    blobs: dict[str, bytes] = {}

    def err(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/")
    async def root() -> Response:
        return Response("Ollama is running", status_code=recorder.faults.health_status)

    @app.get("/api/tags")
    async def tags() -> Any:
        if recorder.faults.health_status != 200:
            return err(recorder.faults.health_status, "unavailable")
        return {
            "models": [
                {
                    "name": n,
                    "model": n,
                    "modified_at": _now(),
                    "size": 1,
                    "digest": "0" * 64,
                    "details": {"format": "gguf", "family": "qwen2"},
                }
                for n in models
            ]
        }

    @app.head("/api/blobs/{digest}")
    async def has_blob(digest: str) -> Response:
        recorder.requests.append(Recorded("HEAD", f"/api/blobs/{digest}", None))
        return Response(status_code=200 if digest in blobs else 404)

    @app.post("/api/blobs/{digest}")
    async def push_blob(digest: str, request: Request) -> Response:
        data = await request.body()
        recorder.requests.append(Recorded("POST", f"/api/blobs/{digest}", len(data)))
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            return err(400, "digest mismatch")
        blobs[digest] = data
        return Response(status_code=201)

    @app.post("/api/create")
    async def create(request: Request) -> Any:
        body = await request.json()
        recorder.requests.append(Recorded("POST", "/api/create", body))
        source = body.get("from")
        if not isinstance(body.get("model"), str) or not source:
            return err(400, "neither 'from' or 'files' was specified")
        if _tag(source) not in models:
            return err(404, f"model '{source}' not found")
        adapters: dict[str, str] = body.get("adapters") or {}
        for digest in adapters.values():
            if digest not in blobs:
                return err(400, f"blob {digest} not found")
        digest = next(iter(adapters.values()), "sha256:none")
        models[_tag(body["model"])] = f"{models[_tag(source)]} +{digest[7:15]}"
        if body.get("stream") is False:
            return {"status": "success"}
        lines = [{"status": "using existing layer"}, {"status": "writing manifest"}, {"status": "success"}]
        return Response("".join(json.dumps(line) + "\n" for line in lines), media_type="application/x-ndjson")

    @app.delete("/api/delete")
    async def delete(request: Request) -> Any:
        body = await request.json()
        recorder.requests.append(Recorded("DELETE", "/api/delete", body))
        if models.pop(_tag(str(body.get("model"))), None) is None:
            return err(404, f"model '{body.get('model')}' not found")
        return Response(status_code=200)

    @app.post("/api/generate")
    async def generate(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            return err(400, "invalid character in JSON body")
        recorder.requests.append(Recorded("POST", "/api/generate", body))
        faults = recorder.faults
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return err(400, "model is required")
        if _tag(model) not in models:
            return err(404, f"model '{model}' not found")
        if faults.status is not None:
            return err(faults.status, "llama runner process has terminated")
        options = body.get("options") or {}
        answer = models[_tag(model)]
        if not body.get("raw"):
            answer = "[templated] " + answer  # a real Ollama would wrap the prompt in the model's TEMPLATE
        num_predict = options.get("num_predict", -1)
        limit = 10**9 if num_predict is None or num_predict < 0 else num_predict
        out, finish = apply_stop(pieces_of(answer), limit, list(options.get("stop") or []))
        prompt = str(body.get("prompt", ""))
        final = {
            "model": model,
            "created_at": _now(),
            "response": "",
            "done": True,
            "done_reason": finish,
            "total_duration": 1000,
            "load_duration": 10,
            "prompt_eval_count": len(prompt.split()),
            "prompt_eval_duration": 100,
            "eval_count": len(out),
            "eval_duration": 800,
        }
        if body.get("stream") is False:
            return {**final, "response": "".join(out)}

        async def stream() -> AsyncIterator[str]:
            await asyncio.sleep(faults.delay_first)
            for i, piece in enumerate(out):
                if faults.drop_after is not None and i == faults.drop_after:
                    raise DroppedConnection
                if faults.error_after is not None and i == faults.error_after:
                    yield json.dumps({"error": "an error was encountered while running the model"}) + "\n"
                    return
                yield json.dumps({"model": model, "created_at": _now(), "response": piece, "done": False}) + "\n"
                await asyncio.sleep(faults.delay_each)
            yield json.dumps(final) + "\n"

        return StreamingResponse(tracked(recorder, stream()), media_type="application/x-ndjson")

    return app
