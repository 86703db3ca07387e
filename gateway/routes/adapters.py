"""Adapter lifecycle: ``GET/POST /v1/adapters``, ``DELETE /v1/adapters/{name}``, and vLLM's
``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter`` so scripts written for vLLM keep working.

With ``--admin-key`` these need ``Authorization: Bearer <admin key>``; without it, the ``--api-key`` check applies.
With ``--workers N`` (N > 1) loads and unloads are refused with 409: each worker process has its own adapter pool
and a request reaches one of them, so a load would exist in one process only. Adapters then come from the
configuration and ``--adapter-root`` (which every worker serves alike); listing still works.
The rules (roots, safetensors, shapes, eviction) live in ``gateway.adapters.AdapterPool``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from gateway.adapters import Adapter
from gateway.errors import Conflict
from gateway.protocol.adapters import (
    AdapterDeleted,
    AdapterList,
    AdapterObject,
    LoadAdapterRequest,
    VLLMLoadLoraRequest,
    VLLMUnloadLoraRequest,
)
from gateway.routes.deps import gateway_state, require_admin_key
from gateway.state import GatewayState

router = APIRouter(dependencies=[Depends(require_admin_key)])


async def single_process(request: Request) -> None:
    workers = (await gateway_state(request)).settings.workers
    if workers > 1:
        raise Conflict(f"This gateway runs {workers} worker processes (--workers), each with its own adapters, so "
                       "adapters cannot be loaded or unloaded at runtime: add them to the configuration or put them "
                       "under an --adapter-root, and restart.", code="multiple_workers")


changes = [Depends(single_process)]


def describe(adapter: Adapter, state: GatewayState) -> AdapterObject:
    policy = state.policies.for_model(adapter.name, adapter.info.path)
    return AdapterObject(
        id=adapter.name,
        path=str(adapter.info.path),
        state=adapter.state,
        reason=adapter.reason,
        source=adapter.source,
        size_bytes=adapter.info.size_bytes,
        rank=adapter.info.rank,
        target_modules=list(adapter.info.target_modules),
        template=adapter.template.template.name,
        template_source=adapter.template.source,
        last_used=adapter.last_used,
        in_flight=adapter.in_flight,
        pinned=adapter.pinned,
        loads=adapter.loads,
        tool_policy=policy.tools.policy,
        tool_handling=policy.tools.summary,
        sampling_defaults=dict(policy.sampling.values),
    )


@router.get("/v1/adapters")
async def list_adapters(state: GatewayState = Depends(gateway_state)) -> AdapterList:
    await state.adapters.refresh_catalog()
    return AdapterList(data=[describe(a, state) for a in state.adapters.catalog()])


@router.post("/v1/adapters", dependencies=changes)
async def load_adapter(body: LoadAdapterRequest, state: GatewayState = Depends(gateway_state)) -> AdapterObject:
    adapter = await state.adapters.load(body.name, body.path, template=body.template, base=body.base)
    return describe(adapter, state)


@router.delete("/v1/adapters/{name:path}", dependencies=changes)
async def unload_adapter(name: str, state: GatewayState = Depends(gateway_state)) -> AdapterDeleted:
    await state.adapters.unload(name)
    return AdapterDeleted(id=name)


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, dependencies=changes)
async def vllm_load(body: VLLMLoadLoraRequest, state: GatewayState = Depends(gateway_state)) -> str:
    await state.adapters.load(body.lora_name, body.lora_path)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, dependencies=changes)
async def vllm_unload(body: VLLMUnloadLoraRequest, state: GatewayState = Depends(gateway_state)) -> str:
    await state.adapters.unload(body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
