"""``gateway serve --check-config``: everything start-up decides from settings and files, without loading weights,
contacting an upstream or opening a port. Used by CI on the deploy files and by operators before a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.adapter_files import BaseShapes, inspect_adapter
from gateway.errors import AdapterLoadError
from gateway.loading import _resolve, with_demo_models
from gateway.settings import Settings, SettingsError


async def check_config(settings: Settings) -> dict[str, Any]:
    """A summary of what ``settings`` would serve; raises ``SettingsError`` (a sentence) for what would fail."""
    settings = await with_demo_models(settings)
    assert settings.model is not None  # Settings.load guarantees a model or --demo
    model_dir = Path(settings.model)
    local = model_dir.is_dir()
    if settings.backend == "torch" and not local:
        raise SettingsError(f"--model {settings.model}: no such folder (the torch backend needs local weights)")
    base_template = _resolve(None, None, settings, model_dir if local else None)
    shapes = BaseShapes.read(model_dir if local else None)
    base_name = settings.served_model_name or (model_dir.name if local else settings.model)
    adapters = []
    for adapter in settings.adapters:
        folder = Path(adapter.path)
        if not folder.is_dir():
            raise SettingsError(f"--adapter {adapter.name}={adapter.path}: no such folder")
        try:
            info = inspect_adapter(folder.resolve(), shapes, base_names=(base_name, settings.model, model_dir.name),
                                   allow_unsafe=settings.allow_unsafe_adapters)
        except AdapterLoadError as exc:
            raise SettingsError(f"--adapter {adapter.name}: {exc.message}") from exc
        template = _resolve(adapter.template, folder, settings, model_dir if local else None)
        adapters.append({"name": adapter.name, "path": str(info.path), "rank": info.rank,
                         "template": template.template.name, "template_source": template.source})
    for root in settings.adapter_roots:
        if not Path(root).is_dir():
            raise SettingsError(f"--adapter-root {root}: no such folder")
    return {
        "model": base_name,
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
