"""The two calls the serving routes make into experiments: resolve a route before the lease, observe the answer."""

from __future__ import annotations

from fastapi import Request

from gateway.experiments.recording import Observation, sampling_of
from gateway.experiments.routing import SESSION_HEADER, Resolution
from gateway.generation import PreparedPrompt
from gateway.protocol.common import SamplingFields
from gateway.request_context import current_request
from gateway.state import GatewayState


def resolve_route(state: GatewayState, body: SamplingFields, request: Request | None) -> Resolution:
    """``body.model`` as a served model: a route's variant for this client, or the model itself."""
    session = request.headers.get(SESSION_HEADER) if request is not None else None
    resolution = state.routes.resolve(body.model, user=body.user, session=session)  # type: ignore[attr-defined]
    context = current_request()
    if context is not None and resolution.route is not None:  # metrics and the access log: labelled by route
        context.model, context.variant = resolution.route, resolution.variant
    return resolution


def observe(state: GatewayState, response_id: str, endpoint: str, resolution: Resolution, body: SamplingFields,
            prompt: PreparedPrompt) -> Observation:
    """An observation that records this response in the feedback store when its streams end."""
    return Observation(state.feedback, response_id, endpoint, resolution, prompt=prompt.text,
                       prompt_tokens=len(prompt.token_ids), sampling=sampling_of(body),
                       keep_text=state.settings.feedback_store_text)
