"""Per-model serving policy: the sampling defaults and the tool handling of the base and of each adapter.

Built once in the lifespan (``GatewayState.policies``); each model's policy is worked out from its folders and the
settings the first time it is asked for, and kept (folders are read once per model, not per request).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gateway.registry import Target
from gateway.sampling_defaults import SamplingDefaults, resolve_sampling_defaults
from gateway.settings import AdapterConfig, Settings
from gateway.tool_policy import ToolHandling, resolve_tool_handling


@dataclass(frozen=True)
class ModelPolicy:
    sampling: SamplingDefaults
    tools: ToolHandling


@dataclass
class ModelPolicies:
    settings: Settings
    base_dir: Path | None  # the base's local folder; None for an upstream-only base
    _known: dict[tuple[str, str | None], ModelPolicy] = field(default_factory=dict)

    def for_model(self, name: str, adapter_dir: str | Path | None) -> ModelPolicy:
        """The policy of the base (``adapter_dir is None``) or of adapter ``name`` loaded from ``adapter_dir``."""
        key = (name, None if adapter_dir is None else str(adapter_dir))
        policy = self._known.get(key)
        if policy is None:
            policy = self._known[key] = self._resolve(name, None if adapter_dir is None else Path(adapter_dir))
        return policy

    def for_target(self, target: Target) -> ModelPolicy:
        return self.for_model(target.name, None if target.adapter is None else target.root)

    def _configured(self, name: str) -> AdapterConfig | None:
        return next((a for a in self.settings.adapters if a.name == name), None)

    def _resolve(self, name: str, adapter_dir: Path | None) -> ModelPolicy:
        settings = self.settings
        config = self._configured(name) if adapter_dir is not None else None
        sampling = resolve_sampling_defaults(
            mode=settings.generation_config,
            base_dir=self.base_dir,
            adapter_dir=adapter_dir,
            base_config=settings.sampling_defaults,
            adapter_config=config.sampling_defaults if config is not None else None,
        )
        policy = settings.tool_policy
        if adapter_dir is not None:
            own = config.tool_policy if config is not None else None
            policy = settings.adapter_tool_policies.get(name) or own or policy
        tools = resolve_tool_handling(policy, base_dir=self.base_dir, adapter_dir=adapter_dir)
        return ModelPolicy(sampling=sampling, tools=tools)
