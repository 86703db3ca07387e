"""What the gateway serves: one base model and its adapters, each with the chat template it was trained with.

A request's ``model`` is the base's id or an adapter's name; ``resolve`` turns it into a ``Target``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import Conflict, ModelNotFound
from gateway.templates import ChatTemplate, ResolvedTemplate


@dataclass(frozen=True)
class Target:
    """A servable model: the base (``adapter is None``) or one adapter on it."""

    name: str
    base: str
    adapter: str | None
    root: str | None
    template: ChatTemplate
    template_source: str
    created: int = field(default_factory=lambda: int(time.time()))


class Registry:
    def __init__(self, base_name: str, base_root: str | None, base_template: ResolvedTemplate) -> None:
        self.base_name = base_name
        self._targets: dict[str, Target] = {
            base_name: Target(base_name, base_name, None, base_root, base_template.template, base_template.source)
        }

    def resolve(self, model: str) -> Target:
        try:
            return self._targets[model]
        except KeyError:
            raise ModelNotFound(
                f"The model `{model}` does not exist. Served models: {', '.join(self._targets)}.", param="model"
            ) from None

    def add_adapter(self, name: str, path: str | Path, template: ResolvedTemplate) -> Target:
        existing = self._targets.get(name)
        if existing is not None and (existing.adapter is None or existing.root != str(path)):
            raise Conflict(f"a model named `{name}` is already served", param="name")
        target = Target(name, self.base_name, name, str(path), template.template, template.source)
        self._targets[name] = target
        return target

    def remove_adapter(self, name: str) -> Target:
        target = self.resolve(name)
        if target.adapter is None:
            raise Conflict(f"`{name}` is the base model, not an adapter", param="name")
        del self._targets[name]
        return target

    def __iter__(self) -> Iterator[Target]:
        return iter(list(self._targets.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._targets
