"""What the app holds while it runs, built in the lifespan and kept on ``app.state.gateway``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backends.base import Backend
from gateway.adapters import AdapterPool
from gateway.experiments.routing import RouteTable
from gateway.experiments.store import FeedbackStore
from gateway.model_policy import ModelPolicies
from gateway.registry import Registry, Target
from gateway.settings import Settings
from gateway.template_tokens import TemplateTokenizers


@dataclass
class GatewayState:
    settings: Settings
    registry: Registry
    backend: Backend
    tokenizer: Any  # the base's transformers tokenizer (gateway.tokenization.ServedTokenizer)
    max_model_len: int
    adapters: AdapterPool
    policies: ModelPolicies
    routes: RouteTable
    feedback: FeedbackStore
    tokenizers: TemplateTokenizers  # per template: the base tokenizer, or a copy with the template's new tokens
    unknown_fields_seen: set[str] = field(default_factory=set)
    model_eos: tuple[str, ...] = ()  # the base's config eos tokens (gateway.stop_tokens)

    def tokenizer_for(self, target: Target) -> Any:
        """What encodes ``target``'s prompts and decodes its answers: the base tokenizer, or the base's with the
        tokens LLaMA-Factory adds for the target's template (gateway.template_tokens)."""
        return self.tokenizers.for_template(target.template)
