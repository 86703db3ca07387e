"""``GET /v1/models``: the base and every adapter, with the template each one uses and why."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from gateway.protocol.models import Model, ModelList
from gateway.registry import Target
from gateway.routes.deps import gateway_state, require_api_key
from gateway.settings import RouteConfig
from gateway.state import GatewayState

router = APIRouter(dependencies=[Depends(require_api_key)])


def describe(target: Target, state: GatewayState) -> Model:
    policy = state.policies.for_target(target)
    return Model(
        id=target.name,
        created=target.created,
        root=target.root,
        parent=None if target.adapter is None else target.base,
        template=target.template.name,
        template_source=target.template_source,
        max_model_len=state.max_model_len,
        tool_policy=policy.tools.policy,
        tool_handling=policy.tools.summary,
        sampling_defaults=dict(policy.sampling.values),
        **_refusal(target, state),
    )


def describe_route(name: str, config: RouteConfig, state: GatewayState) -> Model:
    """A route as a model; a blind route does not list its variants."""
    templates = {state.adapters.resolve(v).template.name for v in config.variants}
    how = "a blind route" if config.blind else "a route over " + ", ".join(config.variants)
    return Model(id=name, created=0, template=templates.pop() if len(templates) == 1 else "mixed",
                 template_source=f"{how} (each request uses its variant's template)", max_model_len=state.max_model_len)


def _refusal(target: Target, state: GatewayState) -> dict[str, str]:
    reason = None if target.adapter is None else state.adapters.refusal_reason(target.adapter)
    return {} if reason is None else {"state": "refused", "reason": reason}


@router.get("/v1/models")
async def list_models(state: GatewayState = Depends(gateway_state)) -> ModelList:
    await state.adapters.refresh_catalog()
    targets = [describe(t, state) for t in state.adapters.targets()]
    return ModelList(data=targets + [describe_route(n, c, state) for n, c in state.routes])


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, state: GatewayState = Depends(gateway_state)) -> Model:
    await state.adapters.refresh_catalog()
    for target in state.adapters.targets():
        if target.name == model_id:
            return describe(target, state)
    route = state.routes.get(model_id)
    if route is not None:
        return describe_route(model_id, route, state)
    return describe(state.registry.resolve(model_id), state)  # raises ModelNotFound
