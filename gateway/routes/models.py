"""``GET /v1/models``: the base and every adapter, with the template each one uses and why."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from gateway.protocol.models import Model, ModelList
from gateway.registry import Target
from gateway.routes.deps import gateway_state, require_api_key
from gateway.state import GatewayState

router = APIRouter(dependencies=[Depends(require_api_key)])


def describe(target: Target, state: GatewayState) -> Model:
    return Model(
        id=target.name,
        created=target.created,
        root=target.root,
        parent=None if target.adapter is None else target.base,
        template=target.template.name,
        template_source=target.template_source,
        max_model_len=state.max_model_len,
    )


@router.get("/v1/models")
async def list_models(state: GatewayState = Depends(gateway_state)) -> ModelList:
    await state.adapters.refresh_catalog()
    return ModelList(data=[describe(t, state) for t in state.adapters.targets()])


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, state: GatewayState = Depends(gateway_state)) -> Model:
    await state.adapters.refresh_catalog()
    for target in state.adapters.targets():
        if target.name == model_id:
            return describe(target, state)
    return describe(state.registry.resolve(model_id), state)  # raises ModelNotFound
