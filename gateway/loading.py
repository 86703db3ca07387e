"""Start-up: from settings to a running ``GatewayState`` (tokenizer, templates, backend, adapters, registry)."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from backends.base import Backend
from gateway.adapter_files import BaseShapes
from gateway.adapters import AdapterPool
from gateway.errors import AdapterLoadError, GatewayError
from gateway.experiments.routing import RouteTable, check_route
from gateway.experiments.store import SQLiteFeedbackStore, default_path
from gateway.metrics import Metrics
from gateway.model_policy import ModelPolicies
from gateway.registry import Registry
from gateway.settings import AdapterConfig, Settings, SettingsError
from gateway.state import GatewayState
from gateway.stop_tokens import model_eos_tokens
from gateway.template_tokens import TemplateTokenizers, TemplateTokensError, embedding_rows
from gateway.templates import ResolvedTemplate, TemplateNotFound, TemplateResolutionError, resolve_template
from gateway.tokenization import ServedTokenizer

log = logging.getLogger(__name__)

DEMO_BASE_NAME = "tiny-qwen"


async def with_demo_models(settings: Settings) -> Settings:
    """With ``--demo``: build (or reuse) the demo models and serve them, plus anything else configured."""
    if not settings.demo:
        return settings
    from gateway.demo import build_demo

    demo = await anyio.to_thread.run_sync(build_demo)
    configured = {a.name for a in settings.adapters}
    # Tool policies from the demo's training data: render for a model trained with tools; the base (trained
    # without) ignores them, the other adapters take the default for fine-tunes (auto: only with tool_choice).
    tools = demo.trained_with_tools
    adapters = settings.adapters + tuple(
        AdapterConfig(name=name, path=str(path), tool_policy="render" if tools.get(name) else "auto")
        for name, path in demo.adapters.items() if name not in configured
    )
    return settings.model_copy(update={
        "model": str(demo.base_dir),
        "served_model_name": settings.served_model_name or DEMO_BASE_NAME,
        "template": settings.template or "qwen",
        "adapters": adapters,
        "tool_policy": settings.tool_policy or ("render" if tools.get("base") else "ignore"),
    })


def _resolve(explicit: str | None, adapter_dir: Path | None, settings: Settings, base_dir: Path | None,
             training_config: str | None = None) -> Any:
    try:
        return resolve_template(explicit=explicit, adapter_dir=adapter_dir, base_template=settings.template,
                                base_dir=base_dir,
                                training_config=Path(training_config) if training_config else None)
    except (TemplateNotFound, TemplateResolutionError) as exc:
        raise SettingsError(str(exc)) from exc


async def load_tokenizer(source: str) -> Any:
    def load() -> Any:
        from transformers import AutoTokenizer

        return ServedTokenizer(AutoTokenizer.from_pretrained(source))

    try:
        return await anyio.to_thread.run_sync(load)
    except OSError as exc:
        raise SettingsError(f"cannot load a tokenizer from {source}: {exc}") from exc


async def create_backend(settings: Settings, model_dir: Path, tokenizer: Any) -> Backend:
    if settings.backend == "torch":
        from backends.torch_native import TorchBackend

        return await TorchBackend.load(
            model_dir,
            device=settings.device,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            pad_token_id=tokenizer.pad_token_id,
            tokenizer=tokenizer.hf,
            stop_on_model_eos=False,  # the gateway sends what ends each request in its stop_token_ids
        )
    from backends.upstream_pool import Timeouts
    from backends.upstreams import start_upstream_backend

    timeouts = Timeouts(
        connect=settings.upstream_connect_timeout,
        first_byte=settings.upstream_first_byte_timeout,
        idle=settings.upstream_idle_timeout,
        health_interval=settings.upstream_health_interval,
    )
    base = settings.upstream_model
    if base is None and not model_dir.is_dir():
        base = settings.model  # not a local folder: it is the upstream's name for the base
    if base is None and settings.backend == "ollama":
        raise SettingsError("--backend ollama needs --upstream-model (the Ollama name of the base model)")
    return await start_upstream_backend(
        settings.backend,
        settings.upstream,
        base_model=base,
        timeouts=timeouts,
        api_key=settings.upstream_api_key,
        runtime_adapters=settings.upstream_runtime_adapters,
        adapter_paths=settings.upstream_adapter_paths,
    )


@dataclass(frozen=True)
class Prepared:
    """Everything start-up builds before it needs the backend (checked, so a wrong setting fails here)."""

    settings: Settings
    tokenizer: Any
    base_name: str
    model_dir: Path
    local: bool
    templates: dict[str, ResolvedTemplate]
    roots: tuple[Path, ...]
    shapes: BaseShapes | None
    runtime_template: Callable[[Path, str | None], ResolvedTemplate]
    tokenizers: TemplateTokenizers


async def prepare(settings: Settings) -> Prepared:
    """Settings checked, tokenizer and templates loaded; raises ``SettingsError`` for what is wrong."""
    settings = await with_demo_models(settings)
    assert settings.model is not None  # Settings.load guarantees a model or --demo
    model_dir = Path(settings.model)
    local = model_dir.is_dir()
    if settings.backend == "torch" and not local:
        raise SettingsError(f"--model {settings.model}: no such folder (the torch backend needs local weights)")
    tokenizer = await load_tokenizer(settings.tokenizer or settings.model)
    base_name = settings.served_model_name or (model_dir.name if local else settings.model)
    tokenizers = TemplateTokenizers(tokenizer, embedding_rows(model_dir if local else None))
    base_template = _resolve(None, None, settings, model_dir if local else None)  # fails now if it is wrong
    for adapter in settings.adapters:
        if not Path(adapter.path).is_dir():
            raise SettingsError(f"--adapter {adapter.name}={adapter.path}: no such folder")
    templates = {a.name: _resolve(a.template, Path(a.path), settings, model_dir, a.training_config)
                 for a in settings.adapters}
    for name, resolved in [(base_name, base_template), *templates.items()]:
        try:  # the tokens a template adds are made (and checked against the model) now, not at the first request
            tokenizers.for_template(resolved.template)
        except TemplateTokensError as exc:
            raise SettingsError(f"{name}: {exc}") from exc
    roots = tuple(Path(root) for root in settings.adapter_roots)
    for root in roots:
        if not root.is_dir():
            raise SettingsError(f"--adapter-root {root}: no such folder")
    shapes = await anyio.to_thread.run_sync(BaseShapes.read, model_dir if local else None)

    def runtime_template(folder: Path, explicit: str | None) -> ResolvedTemplate:
        try:
            resolved = resolve_template(explicit=explicit, adapter_dir=folder, base_template=settings.template,
                                        base_dir=model_dir if local else None)
            tokenizers.for_template(resolved.template)
        except (TemplateNotFound, TemplateResolutionError, TemplateTokensError) as exc:
            raise AdapterLoadError(str(exc), param="template") from exc
        return resolved

    return Prepared(settings, tokenizer, base_name, model_dir, local, templates, roots, shapes, runtime_template,
                    tokenizers)


async def connect(prepared: Prepared, backend: Backend | None = None, metrics: Metrics | None = None) -> GatewayState:
    """Start the backend and the adapter pool. Raises ``BackendUnavailable`` while an upstream cannot be reached
    (everything started is closed again, so it may be called again)."""
    p = prepared
    settings, model_dir, local = p.settings, p.model_dir, p.local
    assert settings.model is not None
    registry = Registry(p.base_name, str(model_dir) if local else None,
                        _resolve(None, None, settings, model_dir if local else None))
    backend = backend or await create_backend(settings, model_dir, p.tokenizer)
    pool = AdapterPool(backend, registry, roots=p.roots, shapes=p.shapes,
                       base_names=(p.base_name, settings.model, model_dir.name), max_adapters=settings.adapter_limit(),
                       pins=settings.pins, allow_unsafe=settings.allow_unsafe_adapters,
                       resolve_template=p.runtime_template, metrics=metrics,
                       scan_interval=settings.adapter_scan_interval)
    try:
        await pool.start([(a.name, Path(a.path), p.templates[a.name]) for a in settings.adapters])
    except AdapterLoadError as exc:
        await backend.aclose()
        raise SettingsError(exc.message) from exc
    except BaseException:
        await backend.aclose()
        raise
    for entry in pool.catalog():
        if entry.state != "refused":  # refusals were logged by the pool, one line each
            log.info("serving adapter %s (%s, %s: %s)", entry.name, entry.state, entry.template.template.name,
                     entry.template.source)
    max_len = backend.capabilities.max_context or settings.max_model_len or int(p.tokenizer.model_max_length)
    try:
        routes = build_routes(settings, pool)
        feedback = await open_feedback_store(settings)
    except BaseException:
        await backend.aclose()
        raise
    base_folder = _base_folder(settings, model_dir, local)
    return GatewayState(settings=settings, registry=registry, backend=backend, tokenizer=p.tokenizer,
                        max_model_len=max_len, adapters=pool, routes=routes, feedback=feedback,
                        policies=ModelPolicies(settings, base_folder), tokenizers=p.tokenizers,
                        model_eos=model_eos_tokens(base_folder, p.tokenizer))


def _base_folder(settings: Settings, model_dir: Path, local: bool) -> Path | None:
    """Where the base's generation_config.json and tokenizer chat template are read: its folder, or with an
    upstream-only base, the --tokenizer folder."""
    if local:
        return model_dir
    return Path(settings.tokenizer) if settings.tokenizer and Path(settings.tokenizer).is_dir() else None


def serves(pool: AdapterPool, name: str) -> bool:
    """Whether ``name`` is a served model (base, adapter, or run folder under a root)."""
    try:
        pool.resolve(name)
    except GatewayError:
        return False
    return True


def build_routes(settings: Settings, pool: AdapterPool) -> RouteTable:
    """The configured routes, each checked against the served models."""
    table = RouteTable(settings.routes)
    for name, config in settings.routes.items():
        try:
            check_route(name, config, is_model=lambda n: serves(pool, n), is_route=table.__contains__)
        except GatewayError as exc:
            raise SettingsError(f"--route {exc.message}") from exc
    return table


async def open_feedback_store(settings: Settings) -> SQLiteFeedbackStore:
    path = settings.feedback_db or default_path()
    try:
        return await SQLiteFeedbackStore.open(path)
    except (sqlite3.Error, OSError) as exc:
        raise SettingsError(f"--feedback-db {path}: cannot open it as a SQLite database: {exc}") from exc


async def build_state(settings: Settings, backend: Backend | None = None) -> GatewayState:
    return await connect(await prepare(settings), backend)
