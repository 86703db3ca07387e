"""Run every example through every model over the gateway's own API, concurrently, with a progress bar per model.

The same client code serves both ways of running: against a gateway at a URL, or in-process
(``create_app(settings)`` behind ``httpx.ASGITransport``, its lifespan run here). Per example and model the runner
asks ``/v1/chat/render`` for the exact prompt (what ``generated_predictions.jsonl`` records) and
``/v1/chat/completions`` for the answer. Requests of all models interleave under one bound on requests in flight,
so the native engine batches them, adapters mixed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from tqdm import tqdm

from gateway.eval.datasets import Example
from gateway.eval.metrics import similarity
from gateway.eval.results import ModelRun, Prediction
from gateway.settings import Settings


class EvalError(RuntimeError):
    """A request of the eval failed; the message says which model, which example and what the server said."""


@dataclass(frozen=True)
class Sampling:
    """The sampling fields sent with every request (``None``: the server's default)."""

    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int = 1024
    seed: int | None = None

    def fields(self) -> dict[str, Any]:
        values = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                  "max_tokens": self.max_tokens, "seed": self.seed}
        return {k: v for k, v in values.items() if v is not None}


@asynccontextmanager
async def remote_client(url: str, api_key: str | None, timeout: float) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the gateway at ``url`` (without ``/v1``)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers,
                                 timeout=httpx.Timeout(timeout, connect=10.0)) as client:
        yield client


@asynccontextmanager
async def in_process_client(settings: Settings, timeout: float) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway built from ``settings`` in this process (models loaded here), and a client for it."""
    from gateway.app import create_app

    app = create_app(settings)
    key = settings.api_key or next(iter(settings.api_keys), None)
    key = key.partition(":")[2] if key and ":" in key else key  # a NAME:KEY entry sends its KEY
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway",
                                     headers=headers, timeout=timeout) as client:
            yield client


def predicted_text(message: dict[str, Any]) -> str:
    """The answer as LLaMA-Factory's data holds one: the text, or for tool calls their function-turn JSON."""
    calls = message.get("tool_calls")
    if not calls:
        return message.get("content") or ""
    turn = []
    for call in calls:
        arguments = call["function"].get("arguments", "")
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # keep what the model wrote
        turn.append({"name": call["function"]["name"], "arguments": arguments})
    return json.dumps(turn, ensure_ascii=False)


async def _post(client: httpx.AsyncClient, path: str, body: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        response = await client.post(path, json=body)
    except httpx.HTTPError as exc:
        raise EvalError(f"{where}: {path} failed: {exc!r}") from exc
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        raise EvalError(f"{where}: {path} answered {response.status_code}: {message}")
    data: dict[str, Any] = response.json()
    return data


async def predict_one(client: httpx.AsyncClient, model: str, example: Example,
                      sampling: Sampling) -> tuple[str, str]:
    """One example through one model: the prompt it received and its answer."""
    body: dict[str, Any] = {"model": model, "messages": example.messages, **sampling.fields()}
    if example.tools:
        body["tools"] = example.tools
    where = f"model {model!r}, example {example.source}"
    rendered = await _post(client, "/v1/chat/render", body, where)
    completion = await _post(client, "/v1/chat/completions", body, where)
    return rendered["prompt"], predicted_text(completion["choices"][0]["message"])


async def run_models(client: httpx.AsyncClient, models: Sequence[str], examples: Sequence[Example],
                     sampling: Sampling, concurrency: int, progress: bool = True) -> list[ModelRun]:
    """Every example through every model, at most ``concurrency`` requests in flight; runs in ``models`` order."""
    limit = asyncio.Semaphore(concurrency)
    bars = [tqdm(total=len(examples), desc=model, unit="ex", position=i, disable=not progress, leave=True,
                 dynamic_ncols=True) for i, model in enumerate(models)]
    started = time.perf_counter()
    finished = dict.fromkeys(models, started)

    async def one(i: int, example: Example) -> tuple[str, str]:
        async with limit:
            prediction = await predict_one(client, models[i], example, sampling)
        finished[models[i]] = time.perf_counter()
        bars[i].update()
        return prediction

    # Example-major order: every model's request for an example goes out together, so they share batches.
    tasks = [asyncio.ensure_future(one(i, example)) for example in examples for i in range(len(models))]
    try:
        done = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        for bar in bars:
            bar.close()
    # Scored once all answers are in: jieba's first use loads its dictionary (~1 s), which would stall an
    # in-process server's event loop mid-run.
    return [ModelRun(model=model, seconds=finished[model] - started, predictions=[
        Prediction(prompt=prompt, predict=predict, label=example.label, scores=similarity(predict, example.label))
        for (prompt, predict), example in zip(done[i::len(models)], examples, strict=True)])
        for i, model in enumerate(models)]
