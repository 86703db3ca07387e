"""Adapter lifecycle: ``GET/POST /v1/adapters``, ``DELETE /v1/adapters/{name}``, and vLLM's
``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter`` so scripts written for vLLM keep working.

With ``--admin-key`` these need ``Authorization: Bearer <admin key>``; without it, the ``--api-key`` check applies.
The rules (roots, safetensors, shapes, eviction) live in ``gateway.adapters.AdapterPool``.
"""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from gateway.adapters import Adapter
from gateway.errors import AuthenticationError
from gateway.protocol.adapters import (
    AdapterDeleted,
    AdapterList,
    AdapterObject,
    LoadAdapterRequest,
    VLLMLoadLoraRequest,
    VLLMUnloadLoraRequest,
)
from gateway.routes.deps import gateway_state, require_api_key
from gateway.state import GatewayState


async def require_admin_key(request: Request) -> None:
    expected = (await gateway_state(request)).settings.admin_key
    if expected is None:
        await require_api_key(request)
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise AuthenticationError("The adapter admin API needs `Authorization: Bearer <admin key>`.",
                                  code="invalid_admin_key")


router = APIRouter(dependencies=[Depends(require_admin_key)])


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
    return AdapterList(data=[describe(a, state) for a in state.adapters.catalog()])


@router.post("/v1/adapters")
async def load_adapter(body: LoadAdapterRequest, state: GatewayState = Depends(gateway_state)) -> AdapterObject:
    adapter = await state.adapters.load(body.name, body.path, template=body.template, base=body.base)
    return describe(adapter, state)


@router.delete("/v1/adapters/{name:path}")
async def unload_adapter(name: str, state: GatewayState = Depends(gateway_state)) -> AdapterDeleted:
    await state.adapters.unload(name)
    return AdapterDeleted(id=name)


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def vllm_load(body: VLLMLoadLoraRequest, state: GatewayState = Depends(gateway_state)) -> str:
    await state.adapters.load(body.lora_name, body.lora_path)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def vllm_unload(body: VLLMUnloadLoraRequest, state: GatewayState = Depends(gateway_state)) -> str:
    await state.adapters.unload(body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
