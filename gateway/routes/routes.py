"""Routes (live splits) at runtime: ``GET /v1/routes`` and ``PUT /v1/routes/{name}`` (admin key), which changes a
route's weights in memory (sticky keys on variants that keep their weight stay where they are; see
``gateway.experiments.routing``). A restart goes back to the configured routes."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from gateway.errors import NotFound
from gateway.experiments.routing import check_route
from gateway.loading import serves
from gateway.protocol.experiments import RouteList, RouteObject, RouteUpdate
from gateway.routes.adapters import require_admin_key
from gateway.routes.deps import gateway_state
from gateway.settings import RouteConfig
from gateway.state import GatewayState

router = APIRouter(dependencies=[Depends(require_admin_key)])


def describe(name: str, config: RouteConfig) -> RouteObject:
    return RouteObject(id=name, variants=dict(config.variants), sticky=config.sticky, blind=config.blind)


@router.get("/v1/routes")
async def list_routes(state: GatewayState = Depends(gateway_state)) -> RouteList:
    return RouteList(data=[describe(n, c) for n, c in state.routes])


@router.get("/v1/routes/{name:path}")
async def get_route(name: str, state: GatewayState = Depends(gateway_state)) -> RouteObject:
    config = state.routes.get(name)
    if config is None:
        raise NotFound(f"no route named {name!r}", param="name")
    return describe(name, config)


@router.put("/v1/routes/{name:path}")
async def put_route(name: str, body: RouteUpdate, state: GatewayState = Depends(gateway_state)) -> RouteObject:
    """Create the route, or replace its variants, weights, stickiness and blindness."""
    check_route(name, body, is_model=lambda n: serves(state.adapters, n), is_route=state.routes.__contains__)
    state.routes.put(name, body)
    return describe(name, body)
