"""``gateway serve --check-config``: everything start-up decides from settings and files, without loading weights,
contacting an upstream or opening a port. Used by CI on the deploy files and by operators before a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.adapter_files import inspect_adapter
from gateway.errors import AdapterLoadError
from gateway.loading import _resolve, prepare
from gateway.settings import Settings, SettingsError


async def check_config(settings: Settings) -> dict[str, Any]:
    """A summary of what ``settings`` would serve; raises ``SettingsError`` (a sentence) for what would fail."""
    p = await prepare(settings)  # the checks start-up makes before the backend (tokenizer, templates, folders)
    settings = p.settings
    assert settings.model is not None  # prepare() has it (or the demo's)
    base_template = _resolve(None, None, settings, p.model_dir if p.local else None)
    adapters = []
    for adapter in settings.adapters:
        try:
            info = inspect_adapter(Path(adapter.path).resolve(), p.shapes,
                                   base_names=(p.base_name, settings.model, p.model_dir.name),
                                   allow_unsafe=settings.allow_unsafe_adapters)
        except AdapterLoadError as exc:
            raise SettingsError(f"--adapter {adapter.name}: {exc.message}") from exc
        template = p.templates[adapter.name]
        adapters.append({"name": adapter.name, "path": str(info.path), "rank": info.rank,
                         "template": template.template.name, "template_source": template.source})
    return {
        "model": p.base_name,
        "backend": settings.backend,
        "upstream": list(settings.upstream),
        "template": base_template.template.name,
        "template_source": base_template.source,
        "adapters": adapters,
        "adapter_roots": list(settings.adapter_roots),
        "max_adapters": settings.adapter_limit(),
        "workers": settings.workers,
        "drain_timeout": settings.drain_timeout,
        "listen": f"{settings.host}:{settings.port}",
    }
