"""What the app holds while it runs, built in the lifespan and kept on ``app.state.gateway``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backends.base import Backend
from gateway.adapters import AdapterPool
from gateway.experiments.routing import RouteTable
from gateway.experiments.store import FeedbackStore
from gateway.model_policy import ModelPolicies
from gateway.registry import Registry
from gateway.settings import Settings


@dataclass
class GatewayState:
    settings: Settings
    registry: Registry
    backend: Backend
    tokenizer: Any  # a transformers tokenizer
    max_model_len: int
    adapters: AdapterPool
    policies: ModelPolicies
    routes: RouteTable
    feedback: FeedbackStore
    unknown_fields_seen: set[str] = field(default_factory=set)
    model_eos: tuple[str, ...] = ()  # the base's config eos tokens (gateway.stop_tokens)
