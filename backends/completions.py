"""What vLLM, LMDeploy and any OpenAI-compatible server share: streaming ``POST /v1/completions``.

``CompletionsBackend`` sends the gateway-rendered prompt (token ids or text, per subclass), the LoRA name as
``model``, reads the SSE answer with ``parse_completion_stream`` and maps adapters to upstream model names.
Subclasses only say how the request body looks and how adapters get onto the upstream.

SSE framing assumed (it is what all three servers send): one JSON object per ``data:`` line, events separated
by blank lines, ``data: [DONE]`` last; with ``stream_options.include_usage`` a last chunk with ``choices: []``
and ``usage``. An object with an ``error`` member (or ``"object": "error"``) inside the stream is an error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from pathlib import PurePosixPath
from typing import Any

from backends.base import Capabilities, Delta, FinishReason, GenerationRequest, Health, TokenLogprob
from backends.upstream_errors import error_from_event, map_error_response
from backends.upstream_pool import UpstreamPool, relay
from gateway.errors import (
    AdapterLoadError,
    BackendUnavailable,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    UpstreamError,
)

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "tool_calls": "stop", "eos": "stop"}


def _token_id(token: str) -> int:
    """vLLM's ``return_tokens_as_token_ids`` spelling of a token: ``token_id:123``."""
    prefix, _, number = token.partition(":")
    if prefix != "token_id" or not number.lstrip("-").isdigit():
        raise UpstreamError(f"upstream logprobs name a token {token[:50]!r}, not token_id:N")
    return int(number)


def parse_logprobs(logprobs: dict[str, Any], top: int) -> list[TokenLogprob | None]:
    """OpenAI's legacy logprob lists with tokens as ``token_id:N``, as entries (``None`` where the logprob is)."""
    entries: list[TokenLogprob | None] = []
    try:
        for token, value, alternatives in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                              logprobs["top_logprobs"], strict=True):
            if value is None:
                entries.append(None)
                continue
            ranked = sorted(((_token_id(t), float(v)) for t, v in (alternatives or {}).items()), key=lambda p: -p[1])
            entries.append(TokenLogprob(_token_id(token), float(value), tuple(ranked[:top])))
    except (KeyError, TypeError, ValueError) as exc:
        raise UpstreamError("upstream sent logprobs that are not OpenAI's completions shape") from exc
    return entries


async def parse_completion_stream(lines: AsyncIterator[str], *, logprobs: int | None = None,
                                  prompt_length: int | None = None) -> AsyncGenerator[Delta, None]:
    """Deltas from an OpenAI ``text_completion`` SSE stream; the last one carries finish reason and usage.

    With ``logprobs`` (alternatives per token), each choice's legacy logprob lists (tokens as ``token_id:N``) become
    the deltas' entries; with ``prompt_length`` as well, the first ``prompt_length`` entries are the echoed prompt's.
    Raises ``UpstreamError`` (or the mapped class of an in-stream error object) when the stream is broken,
    carries an error, or ends without a finish reason.
    """
    finish: str | None = None
    usage: dict[str, Any] | None = None
    prompt_pending = prompt_length
    async for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, ": keep-alive" comments, "event:" / "id:" fields
        data = line[5:].strip()
        if data == "[DONE]":
            async for _ in lines:  # read the body to its end so the connection is reused
                pass
            break
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise UpstreamError(f"upstream sent a stream event that is not JSON: {data[:200]!r}") from exc
        if not isinstance(chunk, dict):
            raise UpstreamError(f"upstream sent a stream event that is not an object: {data[:200]!r}")
        if "error" in chunk or chunk.get("object") == "error":
            raise error_from_event(chunk)
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            text = choice.get("text") or ""
            token_ids = choice.get("token_ids") or ()
            entries: list[TokenLogprob | None] = []
            prompt: tuple[TokenLogprob | None, ...] | None = None
            if logprobs is not None and choice.get("logprobs"):
                entries = parse_logprobs(choice["logprobs"], logprobs)
                if prompt_pending is not None:
                    prompt, entries = tuple(entries[:prompt_pending]), entries[prompt_pending:]
                    prompt_pending = None
            generated = tuple(e for e in entries if e is not None)
            if text or token_ids or generated or prompt is not None:
                yield Delta(token_ids=tuple(token_ids), text=text, logprobs=generated, prompt_logprobs=prompt)
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
    if finish is None:
        raise UpstreamError("upstream stream ended without a finish reason")
    reason = _FINISH.get(finish)
    if reason is None:
        raise UpstreamError(f"upstream finished with {finish!r}")
    yield Delta(
        text="",
        finish_reason=reason,
        prompt_tokens=usage.get("prompt_tokens") if usage else None,
        completion_tokens=usage.get("completion_tokens") if usage else None,
    )


def sse_error(line: str) -> GatewayError | None:
    """The error an SSE line carries (``data: {"error": ...}`` or ``data: {"object": "error", ...}``), if any."""
    if not line.startswith("data:") or "error" not in line:
        return None
    try:
        chunk = json.loads(line[5:])
    except ValueError:
        return None
    if isinstance(chunk, dict) and ("error" in chunk or chunk.get("object") == "error"):
        return error_from_event(chunk)
    return None


_NEUTRAL: dict[str, Any] = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
                            "min_p": 0.0, "logit_bias": (), "logprobs": None, "prompt_logprobs": None,
                            "ignore_eos": False, "top_k": 0}
_REQUEST_NAMES = {"prompt_logprobs": "echo"}  # what the client set, when the backend field has another name


def refuse_unsupported(request: GenerationRequest, engine: str, fields: tuple[str, ...]) -> None:
    """Raise a 400 naming the first of ``fields`` the request sets (to a non-neutral value) and the backend.
    A value the request did not set (the model's default) is not refused: the upstream applies its own."""
    for name in fields:
        if name not in request.sampling.defaulted and getattr(request.sampling, name) != _NEUTRAL[name]:
            param = _REQUEST_NAMES.get(name, name)
            what = "echo with logprobs" if param == "echo" else param
            raise InvalidRequest(f"{what} is not supported by the {engine} backend", param=param)


def sampling_fields(request: GenerationRequest) -> dict[str, Any]:
    """The OpenAI-standard sampling fields of a completions body (penalties and logit bias only when set)."""
    s = request.sampling
    body: dict[str, Any] = {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p}
    if s.seed is not None:
        body["seed"] = s.seed
    if s.stop:
        body["stop"] = list(s.stop)
    if s.frequency_penalty:
        body["frequency_penalty"] = s.frequency_penalty
    if s.presence_penalty:
        body["presence_penalty"] = s.presence_penalty
    if s.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in s.logit_bias}
    return body


def penalty_extensions(request: GenerationRequest) -> dict[str, Any]:
    """vLLM's (and LMDeploy's) ``repetition_penalty`` and ``min_p``, only when set."""
    s = request.sampling
    body: dict[str, Any] = {}
    if s.repetition_penalty != 1.0:
        body["repetition_penalty"] = s.repetition_penalty
    if s.min_p:
        body["min_p"] = s.min_p
    return body


def refuse_constraint(request: GenerationRequest, engine: str) -> None:
    """Structured output the upstream has no field for is refused, never dropped."""
    constraint = request.sampling.constraint
    if constraint is not None:
        raise InvalidRequest(
            f"the {engine} backend cannot constrain the output to a schema or a tool call ({constraint.param})",
            param=constraint.param,
        )


class CompletionsBackend:
    """A ``Backend`` over an upstream's ``/v1/completions``. Call ``start()`` before use, ``aclose()`` after.

    ``base_model`` is the upstream's name for the base model (discovered from ``/v1/models`` when ``None``);
    ``served_adapters`` maps gateway adapter names to LoRA names the upstream already serves under another
    name; ``adapters`` (name -> path) are made available at ``start()`` through ``load_adapter``.
    ``adapter_paths`` maps folder prefixes as the gateway sees them to the same folders as the upstream sees them
    (an upstream on another host or in a container); it applies to every path the upstream is told or shows.
    """

    capabilities = Capabilities(runtime_adapters=False, token_ids_in=False, token_ids_out=False)
    engine = "openai"

    def __init__(
        self,
        pool: UpstreamPool,
        *,
        base_model: str | None = None,
        adapters: Mapping[str, str] | None = None,
        served_adapters: Mapping[str, str] | None = None,
        adapter_paths: Mapping[str, str] | None = None,
    ) -> None:
        self.pool = pool
        self._path_map = sorted(
            ((PurePosixPath(local), PurePosixPath(remote)) for local, remote in (adapter_paths or {}).items()),
            key=lambda pair: -len(pair[0].parts),
        )
        self.base_model = base_model
        self._configured = dict(adapters or {})
        self._served_names = dict(served_adapters or {})
        self._adapters: dict[str, tuple[str, str | None]] = {}  # name -> (upstream model, path we loaded)
        self._adapter_lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start health checks, learn the base model name if not given, make configured adapters available."""
        await self.pool.start()
        if self.base_model is None:
            self.base_model = await self._discover_base_model()
        for name, path in self._configured.items():
            await self.load_adapter(name, path)

    async def aclose(self) -> None:
        await self.pool.aclose()

    async def health(self) -> Health:
        return self.pool.health()

    async def list_models(self) -> list[dict[str, Any]]:
        """The upstream's ``/v1/models`` entries."""
        response = await self.pool.request("GET", "/v1/models", error_mapper=map_error_response)
        try:
            data = response.json()["data"]
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamError("upstream /v1/models answer is not an OpenAI model list") from exc
        return [entry for entry in data if isinstance(entry, dict)]

    async def _discover_base_model(self) -> str:
        models = await self.list_models()
        # vLLM lists LoRAs with a ``parent``; LMDeploy lists the base first. Either way: first without parent.
        bases = [m["id"] for m in models if not m.get("parent")]
        if not bases:
            raise BackendUnavailable("upstream serves no model")
        return str(bases[0])

    # ------------------------------------------------------------------ generation
    def model_for(self, adapter: str | None) -> str:
        """The upstream ``model`` value for a request: the base name, or the adapter's upstream LoRA name."""
        if adapter is None:
            if self.base_model is None:
                raise BackendUnavailable("backend not started: base model name unknown")
            return self.base_model
        entry = self._adapters.get(adapter)
        if entry is None:
            raise ModelNotFound(f"adapter {adapter!r} is not loaded on the upstream")
        return entry[0]

    def build_payload(self, request: GenerationRequest) -> dict[str, Any]:
        """The JSON body for ``/v1/completions``. This one is plain OpenAI: text prompt, standard fields."""
        refuse_unsupported(request, self.engine, ("repetition_penalty", "min_p", "logprobs", "prompt_logprobs"))
        refuse_constraint(request, self.engine)
        return {
            "model": self.model_for(request.adapter),
            "prompt": request.prompt_text,
            **sampling_fields(request),
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the completion; closing the iterator closes the upstream connection (the upstream aborts).

        A request the upstream cannot take (``build_payload``) is refused here, before any stream exists.
        """
        payload = self.build_payload(request)
        lines = self.pool.stream_lines(
            "/v1/completions", payload, error_mapper=map_error_response, first_line_error=sse_error
        )
        return relay(lines, parse_completion_stream)

    # ------------------------------------------------------------------ adapters
    def upstream_path(self, path: str) -> str:
        """``path`` as the upstream sees it: the longest ``adapter_paths`` prefix it lies under, replaced."""
        local = PurePosixPath(path)
        for prefix, remote in self._path_map:
            if local == prefix or prefix in local.parents:
                return str(remote / local.relative_to(prefix))
        return path

    async def load_adapter(self, name: str, path: str) -> None:
        """Make ``name`` usable; returns at once when it already is (from the same path)."""
        async with self._adapter_lock:
            entry = self._adapters.get(name)
            if entry is not None and entry[1] in (None, path):
                return
            self._adapters[name] = await self._register_adapter(name, path)

    async def unload_adapter(self, name: str) -> None:
        """Forget ``name``; adapters this backend loaded at runtime are unloaded from the upstream."""
        async with self._adapter_lock:
            entry = self._adapters.pop(name, None)
            if entry is not None and entry[1] is not None:
                await self._deregister_adapter(entry[0])

    async def _register_adapter(self, name: str, path: str) -> tuple[str, str | None]:
        """Find ``name`` among the LoRAs the upstream serves. Returns (upstream name, path we loaded or None)."""
        served = await self._find_served(name, path)
        if served is None:
            raise AdapterLoadError(
                f"the {self.engine} upstream does not serve adapter {name!r} and cannot load adapters at runtime;"
                f" start it with the adapter or map it to a served name"
            )
        return served, None

    async def _deregister_adapter(self, upstream_name: str) -> None:
        return None

    async def _find_served(self, name: str, path: str) -> str | None:
        wanted = self._served_names.get(name, name)
        models = await self.list_models()
        for model in models:
            if model.get("id") == wanted:
                return wanted
        for model in models:  # served under another name, from the same files
            if model.get("parent") and model.get("root") == self.upstream_path(path):
                return str(model["id"])
        return None
