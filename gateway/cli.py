"""The ``gateway`` command: ``serve``, ``eval``, ``demo build`` and ``template``."""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from gateway.experiments.routing import parse_route
from gateway.settings import AdapterConfig, RouteConfig, Settings, SettingsError
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


def adapter_configs(adapters: list[str], templates: list[str],
                    training: list[str] = []) -> tuple[AdapterConfig, ...] | None:  # noqa: B006
    paths = _pairs(adapters, "--adapter")
    chosen = _pairs(templates, "--adapter-template")
    configs = _pairs(training, "--adapter-config")
    for flag, given in (("--adapter-template", chosen), ("--adapter-config", configs)):
        unknown = sorted(set(given) - set(paths))
        if unknown:
            raise typer.BadParameter(f"no --adapter named {', '.join(unknown)}", param_hint=flag)
    if not paths:
        return None
    return tuple(AdapterConfig(name=n, path=p, template=chosen.get(n), training_config=configs.get(n))
                 for n, p in paths.items())


def route_configs(values: list[str]) -> dict[str, RouteConfig] | None:
    routes: dict[str, RouteConfig] = {}
    for value in values:
        try:
            name, config = parse_route(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--route") from None
        if name in routes:
            raise typer.BadParameter(f"{name!r} given twice", param_hint="--route")
        routes[name] = config
    return routes or None


def server_settings(
    model: Annotated[Optional[str], typer.Option(help=_help("model"))] = None,  # noqa: UP045 (typer needs Optional)
    adapter: Annotated[list[str], typer.Option(help="NAME=DIR: serve a LoRA adapter (repeatable).")] = [],  # noqa: B006
    adapter_template: Annotated[
        list[str], typer.Option(help="NAME=TEMPLATE: the chat template of one adapter (repeatable).")
    ] = [],  # noqa: B006
    template: Annotated[Optional[str], typer.Option(help=_help("template"))] = None,  # noqa: UP045
    tool_policy: Annotated[Optional[str], typer.Option(help=_help("tool_policy"))] = None,  # noqa: UP045
    adapter_config: Annotated[
        list[str], typer.Option(help="NAME=FILE: the LLaMA-Factory training YAML of one adapter, whose `template:` "
                                     "it uses (repeatable).")
    ] = [],  # noqa: B006
    adapter_tool_policy: Annotated[
        list[str], typer.Option(help=_help("adapter_tool_policies") + " (repeatable)")
    ] = [],  # noqa: B006
    generation_config: Annotated[Optional[str], typer.Option(help=_help("generation_config"))] = None,  # noqa: UP045
    history_overflow: Annotated[Optional[str], typer.Option(help=_help("history_overflow"))] = None,  # noqa: UP045
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
    api_key: Annotated[list[str], typer.Option(help=_help("api_keys") + " (repeatable)")] = [],  # noqa: B006
    api_key_file: Annotated[Optional[str], typer.Option(help=_help("api_key_file"))] = None,  # noqa: UP045
    metrics_auth: Annotated[bool, typer.Option("--metrics-auth", help=_help("metrics_auth"))] = False,
    rate_limit_rpm: Annotated[Optional[int], typer.Option(help=_help("rate_limit_rpm"))] = None,  # noqa: UP045
    rate_limit_tpm: Annotated[Optional[int], typer.Option(help=_help("rate_limit_tpm"))] = None,  # noqa: UP045
    max_concurrent_per_key: Annotated[
        Optional[int], typer.Option(help=_help("max_concurrent_per_key"))  # noqa: UP045
    ] = None,
    rate_limit_storage: Annotated[Optional[str], typer.Option(help=_help("rate_limit_storage"))] = None,  # noqa: UP045
    max_messages: Annotated[Optional[int], typer.Option(help=_help("max_messages"))] = None,  # noqa: UP045
    max_tools: Annotated[Optional[int], typer.Option(help=_help("max_tools"))] = None,  # noqa: UP045
    max_tools_bytes: Annotated[Optional[int], typer.Option(help=_help("max_tools_bytes"))] = None,  # noqa: UP045
    cors_origin: Annotated[list[str], typer.Option(help=_help("cors_origins") + " (repeatable)")] = [],  # noqa: B006
    adapter_scan_interval: Annotated[
        Optional[float], typer.Option(help=_help("adapter_scan_interval"))  # noqa: UP045
    ] = None,
    demo: Annotated[bool, typer.Option("--demo", help=_help("demo"))] = False,
    adapter_root: Annotated[list[str], typer.Option(help=_help("adapter_roots") + " (repeatable)")] = [],  # noqa: B006
    max_adapters: Annotated[Optional[int], typer.Option(help=_help("max_adapters"))] = None,  # noqa: UP045
    pin: Annotated[list[str], typer.Option(help=_help("pins") + " (repeatable)")] = [],  # noqa: B006
    allow_unsafe_adapters: Annotated[
        bool, typer.Option("--allow-unsafe-adapters", help=_help("allow_unsafe_adapters"))
    ] = False,
    admin_key: Annotated[Optional[str], typer.Option(help=_help("admin_key"))] = None,  # noqa: UP045
    route: Annotated[list[str], typer.Option(help=_help("routes") + " (repeatable)")] = [],  # noqa: B006
    feedback_db: Annotated[Optional[str], typer.Option(help=_help("feedback_db"))] = None,  # noqa: UP045
    feedback_store_text: Annotated[
        bool, typer.Option("--feedback-store-text", help=_help("feedback_store_text"))
    ] = False,
    drain_timeout: Annotated[Optional[int], typer.Option(help=_help("drain_timeout"))] = None,  # noqa: UP045
    workers: Annotated[Optional[int], typer.Option(help=_help("workers"))] = None,  # noqa: UP045
    stop_on_model_eos: Annotated[
        bool, typer.Option("--stop-on-model-eos", help=_help("stop_on_model_eos"))
    ] = False,
    decode_clean_up: Annotated[Optional[str], typer.Option(help=_help("decode_clean_up"))] = None,  # noqa: UP045
    config: Annotated[Optional[Path], typer.Option(help="YAML file with settings (flags win).")] = None,  # noqa: UP045
) -> Settings:
    """The gateway's settings from the ``serve`` flags (the parameters here); a bad one is a usage error."""
    try:
        settings = Settings.load(
            config,
            model=model,
            adapters=adapter_configs(adapter, adapter_template, adapter_config),
            template=template,
            tool_policy=tool_policy,
            adapter_tool_policies=_pairs(adapter_tool_policy, "--adapter-tool-policy") or None,
            generation_config=generation_config,
            history_overflow=history_overflow,
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
            api_keys=tuple(api_key) or None,
            api_key_file=api_key_file,
            metrics_auth=metrics_auth or None,
            rate_limit_rpm=rate_limit_rpm,
            rate_limit_tpm=rate_limit_tpm,
            max_concurrent_per_key=max_concurrent_per_key,
            rate_limit_storage=rate_limit_storage,
            max_messages=max_messages,
            max_tools=max_tools,
            max_tools_bytes=max_tools_bytes,
            cors_origins=tuple(cors_origin) or None,
            adapter_scan_interval=adapter_scan_interval,
            demo=demo or None,
            adapter_roots=tuple(adapter_root) or None,
            max_adapters=max_adapters,
            pins=tuple(pin) or None,
            allow_unsafe_adapters=allow_unsafe_adapters or None,
            admin_key=admin_key,
            routes=route_configs(route),
            feedback_db=feedback_db,
            feedback_store_text=feedback_store_text or None,
            drain_timeout=drain_timeout,
            workers=workers,
            stop_on_model_eos=stop_on_model_eos or None,
            decode_clean_up=decode_clean_up,
        )
    except SettingsError as exc:
        raise typer.BadParameter(str(exc)) from None
    return settings


@dataclass(frozen=True)
class ServerFlags:
    """The ``serve`` flags as given to a command; ``settings()`` turns them into Settings when it needs them."""

    values: dict[str, Any]

    def given(self) -> list[str]:
        """The flags set to something other than their default, as ``--flag-name``."""
        defaults = {n: p.default for n, p in inspect.signature(server_settings).parameters.items()}
        return ["--" + n.replace("_", "-") for n, v in self.values.items() if v != defaults[n]]

    def settings(self) -> Settings:
        return server_settings(**self.values)


def with_server_flags(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` every ``serve`` flag (the parameters of ``server_settings``), passed to it as one
    ``server: ServerFlags``: commands that start a gateway share the flags instead of copying them."""
    own = inspect.signature(command, eval_str=True)
    flags = inspect.signature(server_settings, eval_str=True).parameters

    @functools.wraps(command)
    def with_flags(**kwargs: Any) -> None:
        command(server=ServerFlags({name: kwargs.pop(name) for name in flags}), **kwargs)

    # typer reads the signature (and type hints) of what it is given.
    with_flags.__signature__ = own.replace(  # type: ignore[attr-defined]
        parameters=[*(p for n, p in own.parameters.items() if n != "server"), *flags.values()])
    with_flags.__annotations__ = {**{n: p.annotation for n, p in own.parameters.items() if n != "server"},
                                  **{n: p.annotation for n, p in flags.items()}, "return": None}
    return with_flags


@app.command()
@with_server_flags
def serve(
    server: ServerFlags,
    check_config: Annotated[bool, typer.Option(
        "--check-config", help="Check the settings and the files they name (templates, adapters; no weights "
        "loaded, no upstream contacted), print a summary as JSON and exit: 0 when serving would start, 2 if not.")
    ] = False,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "info",
) -> None:
    """Serve the OpenAI-compatible API."""
    settings = server.settings()
    if settings.backend == "torch" and settings.model:
        _refuse_unservable_model(settings.model)
    if check_config:
        _check_config(settings)
        return
    from gateway.lifecycle import run_server

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # access_log off: gateway.access writes one JSON line per request instead of uvicorn's text line
        run_server(settings, log_level=log_level.lower(), access_log=False)
    except SettingsError as exc:  # unusable keys or limit storage, found when the app is built
        raise typer.BadParameter(str(exc)) from None


def _refuse_unservable_model(model: str) -> None:
    """A model the native engine cannot carry (a hybrid Mamba cache, …) is a usage error before anything starts,
    not a traceback from the server's start-up (``TorchBackend.load`` refuses it the same way)."""
    from backends.kv_cache import folder_refusal

    refusal = folder_refusal(model)
    if refusal is not None:
        raise typer.BadParameter(refusal, param_hint="--model")


def _check_config(settings: Settings) -> None:
    import anyio

    from gateway.config_check import check_config

    try:
        summary = anyio.run(check_config, settings)
    except SettingsError as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(summary, indent=2))


@app.command("eval")
@with_server_flags
def eval_command(
    server: ServerFlags,
    dataset: Annotated[str, typer.Option(help=(
        "A .json/.jsonl file (alpaca or sharegpt), or with --dataset-dir comma-separated names from its "
        "dataset_info.json."))],
    models: Annotated[str, typer.Option(help="Comma-separated models to evaluate: bases, adapters, routes.")],
    dataset_dir: Annotated[Optional[Path], typer.Option(help=(  # noqa: UP045
        "Folder with LLaMA-Factory's dataset_info.json (column and tag mappings)."))] = None,
    formatting: Annotated[Optional[str], typer.Option(help=(  # noqa: UP045
        "alpaca or sharegpt, for a file without dataset_info.json (default: sharegpt if records have "
        "'conversations')."))] = None,
    max_samples: Annotated[Optional[int], typer.Option(min=1, help="First N examples of each dataset.")] = None,  # noqa: UP045
    out: Annotated[Path, typer.Option(help="Output folder: OUT/MODEL/generated_predictions.jsonl, "
                                           "OUT/MODEL/predict_results.json, OUT/report.html.")] = Path("eval-output"),
    server_url: Annotated[Optional[str], typer.Option("--server", help=(  # noqa: UP045
        "A running gateway's URL (without /v1); default: start one in this process from the serve flags."))] = None,
    temperature: Annotated[float, typer.Option(min=0, max=2, help="0: greedy (LLaMA-Factory's predict samples "
                                                                  "with 0.95, top-p 0.7, top-k 50).")] = 0.0,
    top_p: Annotated[Optional[float], typer.Option(min=0, max=1, help="Nucleus sampling.")] = None,  # noqa: UP045
    top_k: Annotated[Optional[int], typer.Option(min=0, help="Top-k sampling (0: off).")] = None,  # noqa: UP045
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per answer (LLaMA-Factory's max_new_tokens)."
                                            )] = 1024,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed, for reproducible sampled runs.")] = None,  # noqa: UP045
    concurrency: Annotated[int, typer.Option(min=1, help="Most requests in flight (the engine batches them).")] = 16,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds one request may take.")] = 600.0,
    progress: Annotated[bool, typer.Option(help="Progress bars on stderr.")] = True,
) -> None:
    """Offline eval like LLaMA-Factory's do_predict: every example through every model, BLEU-4 and ROUGE, a report.

    Without --server, the gateway runs in this process with the serve flags (--model, --adapter, --demo, ...).
    --api-key is sent with every request (with --server: the key that server requires).
    """
    import asyncio

    from gateway.eval.metrics import missing_libraries

    missing = missing_libraries()
    if missing:
        typer.echo(f"Error: gateway eval needs {', '.join(missing)}: pip install 'lora-gateway[eval]'", err=True)
        raise typer.Exit(1)

    from gateway.eval.datasets import DatasetError
    from gateway.eval.job import EvalJob, run_job
    from gateway.eval.runner import EvalError, Sampling

    given = [flag for flag in server.given() if flag not in ("--api-key",)]
    if server_url is not None and given:
        raise typer.BadParameter(f"{', '.join(given)} start a gateway in this process; with --server, drop them",
                                 param_hint="--server")
    unused = [flag for flag in given if flag in ("--host", "--port")]
    if unused:
        raise typer.BadParameter("eval serves nothing on the network; drop it", param_hint=", ".join(unused))
    job = EvalJob(
        dataset=dataset, models=tuple(m.strip() for m in models.split(",") if m.strip()), out=out,
        sampling=Sampling(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed),
        dataset_dir=dataset_dir, formatting=formatting, max_samples=max_samples, concurrency=concurrency,
        settings=server.settings() if server_url is None else None, server=server_url,
        api_key=next(iter(server.values["api_key"]), None), timeout=timeout, progress=progress,
    )
    try:
        outcome = asyncio.run(run_job(job))
    except DatasetError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dataset") from None
    except EvalError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    if outcome.skipped:
        typer.echo(f"skipped {outcome.skipped} malformed examples (as LLaMA-Factory does)", err=True)
    width = max(len(run.model) for run in outcome.runs)
    typer.echo(f"{'model':<{width}}  bleu-4   rouge-1  rouge-2  rouge-l  examples/s")
    for run in outcome.runs:
        r = run.results()
        typer.echo(f"{run.model:<{width}}  {r['predict_bleu-4']:7.2f}  {r['predict_rouge-1']:7.2f}  "
                   f"{r['predict_rouge-2']:7.2f}  {r['predict_rouge-l']:7.2f}  {r['predict_samples_per_second']:10.2f}")
    typer.echo(f"report: {outcome.report}")


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
