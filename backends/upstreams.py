"""Building a started upstream backend from plain settings: ``--backend vllm|lmdeploy|ollama|openai``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from backends.base import Backend
from backends.lmdeploy import LMDeployBackend
from backends.ollama import OllamaBackend
from backends.openai_compat import OpenAICompatBackend
from backends.upstream_pool import Timeouts, UpstreamPool
from backends.vllm import VLLMBackend

UpstreamKind = Literal["vllm", "lmdeploy", "ollama", "openai"]

HEALTH_PATHS: dict[str, str] = {"vllm": "/health", "lmdeploy": "/health", "ollama": "/api/tags", "openai": "/v1/models"}


async def start_upstream_backend(
    kind: UpstreamKind,
    urls: Sequence[str],
    *,
    base_model: str | None,
    timeouts: Timeouts | None = None,
    api_key: str | None = None,
    runtime_adapters: bool = True,
    adapter_paths: Mapping[str, str] | None = None,
) -> Backend:
    """A started backend for ``kind`` over replicas ``urls``. ``base_model`` is the base's name on the upstream
    (discovered from ``/v1/models`` when ``None``; required for Ollama). Raises ``GatewayError``s when the
    upstream cannot be used (closed again in that case). ``adapter_paths``: gateway folder prefix -> the same
    folder on the upstream (vLLM and LMDeploy read adapters from their own disk; Ollama gets the files uploaded)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    pool = UpstreamPool(urls, timeouts=timeouts, health_path=HEALTH_PATHS[kind], headers=headers)
    backend: VLLMBackend | LMDeployBackend | OpenAICompatBackend | OllamaBackend
    if kind == "vllm":
        backend = VLLMBackend(
            pool, base_model=base_model, runtime_lora_updating=runtime_adapters, adapter_paths=adapter_paths
        )
    elif kind == "lmdeploy":
        backend = LMDeployBackend(pool, base_model=base_model, adapter_paths=adapter_paths)
    elif kind == "openai":
        backend = OpenAICompatBackend(pool, base_model=base_model, adapter_paths=adapter_paths)
    else:
        if base_model is None:
            await pool.aclose()
            raise ValueError("the Ollama backend needs the Ollama name of the base model")
        backend = OllamaBackend(pool, base_model=base_model)
    try:
        await backend.start()
    except BaseException:
        await backend.aclose()
        raise
    return backend
