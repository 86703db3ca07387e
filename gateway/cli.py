"""The ``gateway`` command: ``serve``, ``demo build`` and ``template``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from gateway.settings import AdapterConfig, Settings, SettingsError
from gateway.templates.cli import template_app

app = typer.Typer(help="lora-gateway: serve LoRA fine-tunes with the template they were trained with.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
demo_app = typer.Typer(help="The demo models: a tiny Qwen2 and LoRA adapters, built locally.", no_args_is_help=True)
app.add_typer(demo_app, name="demo")
app.add_typer(template_app, name="template", help="List and render chat templates.")

_FIELDS = Settings.model_fields


def _help(name: str) -> str:
    return _FIELDS[name].description or ""


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise typer.BadParameter(f"expected NAME=VALUE, got {value!r}", param_hint=flag)
        if name in pairs:
            raise typer.BadParameter(f"{name!r} given twice", param_hint=flag)
        pairs[name] = rest
    return pairs


def adapter_configs(adapters: list[str], templates: list[str]) -> tuple[AdapterConfig, ...] | None:
    paths = _pairs(adapters, "--adapter")
    chosen = _pairs(templates, "--adapter-template")
    unknown = sorted(set(chosen) - set(paths))
    if unknown:
        raise typer.BadParameter(f"no --adapter named {', '.join(unknown)}", param_hint="--adapter-template")
    if not paths:
        return None
    return tuple(AdapterConfig(name=n, path=p, template=chosen.get(n)) for n, p in paths.items())


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option(help=_help("model"))] = None,  # noqa: UP045 (typer needs Optional)
    adapter: Annotated[list[str], typer.Option(help="NAME=DIR: serve a LoRA adapter (repeatable).")] = [],  # noqa: B006
    adapter_template: Annotated[
        list[str], typer.Option(help="NAME=TEMPLATE: the chat template of one adapter (repeatable).")
    ] = [],  # noqa: B006
    template: Annotated[Optional[str], typer.Option(help=_help("template"))] = None,  # noqa: UP045
    backend: Annotated[Optional[str], typer.Option(help=_help("backend"))] = None,  # noqa: UP045
    upstream: Annotated[list[str], typer.Option(help=_help("upstream") + " (repeatable)")] = [],  # noqa: B006
    tokenizer: Annotated[Optional[str], typer.Option(help=_help("tokenizer"))] = None,  # noqa: UP045
    upstream_model: Annotated[Optional[str], typer.Option(help=_help("upstream_model"))] = None,  # noqa: UP045
    upstream_api_key: Annotated[Optional[str], typer.Option(help=_help("upstream_api_key"))] = None,  # noqa: UP045
    upstream_adapter_path: Annotated[
        list[str], typer.Option(help=_help("upstream_adapter_paths") + " (repeatable)")
    ] = [],  # noqa: B006
    device: Annotated[Optional[str], typer.Option(help=_help("device"))] = None,  # noqa: UP045
    dtype: Annotated[Optional[str], typer.Option(help=_help("dtype"))] = None,  # noqa: UP045
    served_model_name: Annotated[Optional[str], typer.Option(help=_help("served_model_name"))] = None,  # noqa: UP045
    max_batch_size: Annotated[Optional[int], typer.Option(help=_help("max_batch_size"))] = None,  # noqa: UP045
    max_queue: Annotated[Optional[int], typer.Option(help=_help("max_queue"))] = None,  # noqa: UP045
    max_model_len: Annotated[Optional[int], typer.Option(help=_help("max_model_len"))] = None,  # noqa: UP045
    max_body_bytes: Annotated[Optional[int], typer.Option(help=_help("max_body_bytes"))] = None,  # noqa: UP045
    host: Annotated[Optional[str], typer.Option(help=_help("host"))] = None,  # noqa: UP045
    port: Annotated[Optional[int], typer.Option(help=_help("port"))] = None,  # noqa: UP045
    api_key: Annotated[Optional[str], typer.Option(help=_help("api_key"))] = None,  # noqa: UP045
    demo: Annotated[bool, typer.Option("--demo", help=_help("demo"))] = False,
    adapter_root: Annotated[list[str], typer.Option(help=_help("adapter_roots") + " (repeatable)")] = [],  # noqa: B006
    max_adapters: Annotated[Optional[int], typer.Option(help=_help("max_adapters"))] = None,  # noqa: UP045
    pin: Annotated[list[str], typer.Option(help=_help("pins") + " (repeatable)")] = [],  # noqa: B006
    allow_unsafe_adapters: Annotated[
        bool, typer.Option("--allow-unsafe-adapters", help=_help("allow_unsafe_adapters"))
    ] = False,
    admin_key: Annotated[Optional[str], typer.Option(help=_help("admin_key"))] = None,  # noqa: UP045
    drain_timeout: Annotated[Optional[int], typer.Option(help=_help("drain_timeout"))] = None,  # noqa: UP045
    workers: Annotated[Optional[int], typer.Option(help=_help("workers"))] = None,  # noqa: UP045
    check_config: Annotated[bool, typer.Option(
        "--check-config", help="Check the settings and the files they name (templates, adapters; no weights "
        "loaded, no upstream contacted), print a summary as JSON and exit: 0 when serving would start, 2 if not.")
    ] = False,
    config: Annotated[Optional[Path], typer.Option(help="YAML file with settings (flags win).")] = None,  # noqa: UP045
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "info",
) -> None:
    """Serve the OpenAI-compatible API."""
    try:
        settings = Settings.load(
            config,
            model=model,
            adapters=adapter_configs(adapter, adapter_template),
            template=template,
            backend=backend,
            upstream=tuple(upstream) or None,
            tokenizer=tokenizer,
            upstream_model=upstream_model,
            upstream_api_key=upstream_api_key,
            upstream_adapter_paths=_pairs(upstream_adapter_path, "--upstream-adapter-path") or None,
            device=device,
            dtype=dtype,
            served_model_name=served_model_name,
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            max_model_len=max_model_len,
            max_body_bytes=max_body_bytes,
            host=host,
            port=port,
            api_key=api_key,
            demo=demo or None,
            adapter_roots=tuple(adapter_root) or None,
            max_adapters=max_adapters,
            pins=tuple(pin) or None,
            allow_unsafe_adapters=allow_unsafe_adapters or None,
            admin_key=admin_key,
            drain_timeout=drain_timeout,
            workers=workers,
        )
    except SettingsError as exc:
        raise typer.BadParameter(str(exc)) from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if check_config:
        _check_config(settings)
        return
    from gateway.lifecycle import run_server

    run_server(settings, log_level=log_level.lower())


def _check_config(settings: Settings) -> None:
    import anyio

    from gateway.config_check import check_config

    try:
        summary = anyio.run(check_config, settings)
    except SettingsError as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(summary, indent=2))


@demo_app.command("build")
def demo_build(
    root: Annotated[Optional[Path], typer.Option(help="Where to build; default: the user cache.")] = None,  # noqa: UP045
    force: Annotated[bool, typer.Option(help="Rebuild even if a build is cached.")] = False,
) -> None:
    """Build the demo models (or find the cached build) and print their folders as JSON."""
    from gateway.demo import build_demo

    demo = build_demo(root, force=force)
    typer.echo(json.dumps({"base": str(demo.base_dir), "adapters": {k: str(v) for k, v in demo.adapters.items()}},
                          indent=2))


if __name__ == "__main__":
    app()
