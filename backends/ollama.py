"""Ollama upstream: ``POST /api/generate`` with ``raw: true`` and the gateway-rendered prompt text.

Protocol facts (Ollama's API docs, docs/api.md and docs/api/errors.mdx):

* ``raw: true`` applies no template: the model continues exactly the text we send.
* Streaming answers are NDJSON (``application/x-ndjson``): one object per line with ``response`` (text piece)
  and ``done: false``; the last has ``done: true``, ``done_reason`` (``stop`` / ``length``),
  ``prompt_eval_count`` and ``eval_count``. An error after the stream started is a line ``{"error": "..."}``;
  before, a JSON ``{"error": "..."}`` with a 4xx/5xx status (404: unknown model).
* Sampling goes in ``options``: ``num_predict``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``.
  Ollama has no ``ignore_eos``: such a request is refused rather than silently answered differently.
* Where answers stop: ``options.stop`` takes strings only (sent: the template's eos and stop words, the request's
  stops); a request's options override the model's Modelfile parameters. Ollama has no ``stop_token_ids`` and no
  ``ignore_eos``, and its runner always ends on the model's end-of-generation tokens (the GGUF's eos/eot ids and the
  tokens llama.cpp counts as end of generation). So LLaMA-Factory's rule (the template's stop ids only) holds only
  where those tokens are the template's: ``STOP_RULE`` says so in the log at start.
  Penalties: ``repeat_penalty`` (HF semantics, our ``repetition_penalty``), ``presence_penalty``,
  ``frequency_penalty``, ``min_p`` in ``options``. It has no logit bias and no logprobs on ``/api/generate``:
  refused with a 400.
* Structured output: ``format`` is ``"json"`` (any JSON) or a JSON schema. Forced tool calls are refused (a tool
  format's markers around the JSON are not a schema).
* An adapter is its own Ollama model: ``POST /api/create {"model", "from": <base>, "adapters": {file: digest}}``
  after uploading each file with ``POST /api/blobs/sha256:<digest>`` (``HEAD`` answers 200 when it is there).
  ``DELETE /api/delete {"model"}`` removes it. ``GET /api/tags`` lists models (we use it for health too).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from backends.base import Capabilities, Delta, FinishReason, GenerationRequest, Health
from backends.completions import refuse_unsupported
from backends.upstream_errors import error_from_event, map_adapter_error_response, map_error_response
from backends.upstream_pool import UpstreamPool, relay
from gateway.errors import AdapterLoadError, GatewayError, InvalidRequest, ModelNotFound, UpstreamError

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
log = logging.getLogger(__name__)

STOP_RULE = (
    "ollama upstream: answers also end on the model's end-of-generation tokens (its GGUF's eos/eot ids), which "
    "Ollama always stops on: /api/generate takes stop strings only (options.stop), with no stop token ids and no "
    "ignore_eos; LLaMA-Factory stops on the template's stop ids only, so a model that emits such a token before its "
    "template's eos answers shorter here than in LLaMA-Factory")
_DONE: dict[str, FinishReason] = {"stop": "stop", "length": "length"}


async def parse_ndjson_stream(lines: AsyncIterator[str]) -> AsyncGenerator[Delta, None]:
    """Deltas from an Ollama ``/api/generate`` stream; the last carries finish reason and token counts."""
    async for line in lines:
        if not line.strip():
            continue
        try:
            chunk = json.loads(line)
        except ValueError as exc:
            raise UpstreamError(f"Ollama sent a line that is not JSON: {line[:200]!r}") from exc
        if not isinstance(chunk, dict):
            raise UpstreamError(f"Ollama sent a line that is not an object: {line[:200]!r}")
        if "error" in chunk:
            raise error_from_event(chunk)
        text = chunk.get("response") or ""
        if chunk.get("done"):
            if text:
                yield Delta(text=text)
            async for _ in lines:  # read the body to its end so the connection is reused
                pass
            reason = _DONE.get(chunk.get("done_reason") or "stop")
            if reason is None:
                raise UpstreamError(f"Ollama finished with {chunk.get('done_reason')!r}")
            yield Delta(
                text="",
                finish_reason=reason,
                prompt_tokens=chunk.get("prompt_eval_count"),
                completion_tokens=chunk.get("eval_count"),
            )
            return
        if text:
            yield Delta(text=text)
    raise UpstreamError("Ollama stream ended without a done line")


def ndjson_error(line: str) -> GatewayError | None:
    """The error an NDJSON line carries (``{"error": "..."}``), if any."""
    if '"error"' not in line:
        return None
    try:
        chunk = json.loads(line)
    except ValueError:
        return None
    return error_from_event(chunk) if isinstance(chunk, dict) and "error" in chunk else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


class OllamaBackend:
    """``base_model`` is the Ollama model name of the base (e.g. ``qwen2.5:7b``). ``served_adapters`` maps
    gateway adapter names to Ollama models that already exist; other adapters are created from their folder
    (``adapter_model.safetensors`` + ``adapter_config.json``) on every replica."""

    capabilities = Capabilities(runtime_adapters=True, token_ids_in=False, token_ids_out=False)

    def __init__(
        self,
        pool: UpstreamPool,
        *,
        base_model: str,
        adapters: Mapping[str, str] | None = None,
        served_adapters: Mapping[str, str] | None = None,
        keep_alive: str | None = None,
    ) -> None:
        self.pool = pool
        self.base_model = base_model
        self.keep_alive = keep_alive
        self._configured = dict(adapters or {})
        self._adapters: dict[str, tuple[str, str | None]] = {n: (m, None) for n, m in (served_adapters or {}).items()}
        self._adapter_lock = asyncio.Lock()

    async def start(self) -> None:
        """Start health checks, check the base and mapped models exist, create configured adapters."""
        log.warning(STOP_RULE)
        await self.pool.start()
        names = await self.list_models()
        for model in [self.base_model, *(m for m, _ in self._adapters.values())]:
            if not _has_model(names, model):
                raise ModelNotFound(f"Ollama has no model {model!r} (its /api/tags lists {sorted(names)})")
        for name, path in self._configured.items():
            await self.load_adapter(name, path)

    async def aclose(self) -> None:
        await self.pool.aclose()

    async def health(self) -> Health:
        return self.pool.health()

    async def list_models(self) -> set[str]:
        """Model names from ``/api/tags``."""
        response = await self.pool.request("GET", "/api/tags", error_mapper=map_error_response)
        try:
            return {str(m.get("name") or m.get("model")) for m in response.json()["models"]}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UpstreamError("Ollama /api/tags answer has no model list") from exc

    def model_for(self, adapter: str | None) -> str:
        if adapter is None:
            return self.base_model
        entry = self._adapters.get(adapter)
        if entry is None:
            raise ModelNotFound(f"adapter {adapter!r} is not loaded on Ollama")
        return entry[0]

    def build_payload(self, request: GenerationRequest) -> dict[str, Any]:
        s = request.sampling
        if s.ignore_eos:
            raise InvalidRequest("the Ollama backend cannot ignore the end-of-sequence token", param="ignore_eos")
        refuse_unsupported(request, "ollama", ("logit_bias", "logprobs", "prompt_logprobs"))
        options: dict[str, Any] = {
            "num_predict": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
        }
        if s.seed is not None:
            options["seed"] = s.seed
        if s.stop:
            options["stop"] = list(s.stop)
        if s.repetition_penalty != 1.0:
            options["repeat_penalty"] = s.repetition_penalty
        if s.presence_penalty:
            options["presence_penalty"] = s.presence_penalty
        if s.frequency_penalty:
            options["frequency_penalty"] = s.frequency_penalty
        if s.min_p:
            options["min_p"] = s.min_p
        body: dict[str, Any] = {
            "model": self.model_for(request.adapter),
            "prompt": request.prompt_text,
            "raw": True,
            "stream": True,
            "options": options,
        }
        if self.keep_alive is not None:
            body["keep_alive"] = self.keep_alive
        if s.constraint is not None:
            if s.constraint.prefix or s.constraint.suffix:
                raise InvalidRequest("the Ollama backend cannot force tool calls", param=s.constraint.param)
            schema = json.loads(s.constraint.json_schema)
            body["format"] = "json" if schema == {"type": "object"} else schema
        return body

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the completion; closing the iterator closes the connection, which stops Ollama's generation."""
        lines = self.pool.stream_lines(
            "/api/generate", self.build_payload(request), error_mapper=map_error_response, first_line_error=ndjson_error
        )
        return relay(lines, parse_ndjson_stream)

    # ------------------------------------------------------------------ adapters
    async def load_adapter(self, name: str, path: str) -> None:
        """Create Ollama model ``name`` from the base plus the adapter in folder ``path``; idempotent."""
        async with self._adapter_lock:
            entry = self._adapters.get(name)
            if entry is not None and entry[1] in (None, path):
                return
            files = await asyncio.to_thread(self._digest_files, Path(path))
            for replica in self.pool.replicas:
                for filename, digest in files.items():
                    await self._upload_blob(replica, Path(path) / filename, digest)
                await self.pool.request(
                    "POST",
                    "/api/create",
                    json={"model": name, "from": self.base_model, "adapters": files, "stream": False},
                    replica=replica,
                    error_mapper=map_adapter_error_response,
                )
            self._adapters[name] = (name, path)

    async def unload_adapter(self, name: str) -> None:
        """Delete the Ollama model this backend created for ``name``; mapped models are only forgotten."""
        async with self._adapter_lock:
            entry = self._adapters.pop(name, None)
            if entry is None or entry[1] is None:
                return
            for replica in self.pool.replicas:
                await self.pool.request(
                    "DELETE",
                    "/api/delete",
                    json={"model": entry[0]},
                    replica=replica,
                    error_mapper=map_adapter_error_response,
                    ok_statuses=(404,),
                )

    @staticmethod
    def _digest_files(folder: Path) -> dict[str, str]:
        if not (folder / ADAPTER_FILES[0]).is_file():
            raise AdapterLoadError(f"{folder} has no {ADAPTER_FILES[0]}")
        return {name: _sha256(folder / name) for name in ADAPTER_FILES if (folder / name).is_file()}

    async def _upload_blob(self, replica: Any, file: Path, digest: str) -> None:
        head = await self.pool.request(
            "HEAD", f"/api/blobs/{digest}", replica=replica, error_mapper=map_adapter_error_response, ok_statuses=(404,)
        )
        if head.status_code == 200:
            return
        content = await asyncio.to_thread(file.read_bytes)
        await self.pool.request(
            "POST", f"/api/blobs/{digest}", content=content, replica=replica, error_mapper=map_adapter_error_response
        )


def _has_model(names: set[str], model: str) -> bool:
    """Ollama names default to the ``latest`` tag: ``qwen`` and ``qwen:latest`` are the same model."""
    return model in names or (":" not in model and f"{model}:latest" in names)
