"""The ``gateway`` command: bad input is a usage error with a sentence, never a traceback."""

from __future__ import annotations

from typer.testing import CliRunner

from gateway.cli import adapter_configs, app
from gateway.settings import Settings

runner = CliRunner()


def test_serve_without_a_model_is_a_usage_error() -> None:
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2
    assert "no model to serve" in result.output
    assert "Traceback" not in result.output


def test_bad_adapter_flag_is_a_usage_error() -> None:
    result = runner.invoke(app, ["serve", "--model", "/tmp", "--adapter", "no-equals-sign"])
    assert result.exit_code == 2
    assert "NAME=VALUE" in result.output


def test_adapter_template_must_name_an_adapter() -> None:
    result = runner.invoke(app, ["serve", "--model", "/tmp", "--adapter", "a=/x", "--adapter-template", "b=qwen"])
    assert result.exit_code == 2 and "no --adapter named b" in result.output


def test_adapter_flags_become_settings() -> None:
    configs = adapter_configs(["a=/x", "b=/y"], ["b=llama3"])
    assert configs is not None
    assert [(c.name, c.path, c.template) for c in configs] == [("a", "/x", None), ("b", "/y", "llama3")]


def test_settings_precedence(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "gateway.yaml"
    config.write_text("model: /from/file\nport: 9000\nmax_batch_size: 4\n")
    monkeypatch.setenv("GATEWAY_PORT", "9100")
    settings = Settings.load(config, max_batch_size=16)
    assert (settings.model, settings.port, settings.max_batch_size) == ("/from/file", 9100, 16)


def test_upstream_backend_needs_an_upstream() -> None:
    result = runner.invoke(app, ["serve", "--model", "m", "--backend", "vllm"])
    assert result.exit_code == 2 and "--upstream" in result.output


def test_missing_torch_npu_is_explained() -> None:
    import pytest

    from backends.torch_native import pick_device
    from gateway.errors import BackendUnavailable

    try:
        import torch_npu  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailable, match="torch-npu"):
            pick_device("npu")
    else:  # pragma: no cover - only on Ascend machines
        pytest.skip("torch-npu is installed here")


def test_adapter_lifecycle_flags_are_documented_settings() -> None:
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    for flag in ("--adapter-root", "--max-adapters", "--pin", "--allow-unsafe-adapters", "--admin-key"):
        assert flag in result.output
    assert "least recently used" in result.output  # the Field description is the help text


def test_more_pins_than_adapter_slots_is_a_usage_error() -> None:
    result = runner.invoke(app, ["serve", "--demo", "--max-adapters", "1", "--pin", "a", "--pin", "b"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "pinned adapters must fit" in result.output


def test_adapter_lifecycle_settings_from_the_environment(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("GATEWAY_MAX_ADAPTERS", "3")
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", "k")
    settings = Settings.load(None, model="/m", adapter_roots=("/r1", "/r2"), pins=("p",))
    assert (settings.max_adapters, settings.admin_key, settings.adapter_roots, settings.pins) == (
        3, "k", ("/r1", "/r2"), ("p",))


def test_upstream_adapter_paths_from_file_and_flag_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "model: m\nbackend: vllm\nupstream: [http://gpu:8000]\nupstream_adapter_paths:\n  /data/saves: /saves\n"
    )
    assert Settings.load(config).upstream_adapter_paths == {"/data/saves": "/saves"}
    result = runner.invoke(app, ["serve", "--model", "m", "--upstream-adapter-path", "/data/saves"])
    assert result.exit_code == 2 and "NAME=VALUE" in result.output


def test_route_flags_become_settings() -> None:
    from gateway.cli import route_configs
    from gateway.settings import RouteConfig

    routes = route_configs(["support-bot=pku-assistant:90,cat-assistant:10;sticky=user", "quiet=a:1,b:1;blind"])
    assert routes == {
        "support-bot": RouteConfig(variants={"pku-assistant": 90, "cat-assistant": 10}, sticky="user"),
        "quiet": RouteConfig(variants={"a": 1, "b": 1}, blind=True),
    }


def test_bad_route_flags_are_usage_errors() -> None:
    for flag in ("support-bot", "bot=a:ninety", "bot=a:1;sticky=cookie", "bot=a:1;loud"):
        result = runner.invoke(app, ["serve", "--model", "/tmp", "--route", flag])
        assert result.exit_code == 2, flag
        assert "--route" in result.output and "Traceback" not in result.output
    twice = runner.invoke(app, ["serve", "--model", "/tmp", "--route", "x=a:1", "--route", "x=b:1"])
    assert twice.exit_code == 2 and "given twice" in twice.output


def test_routes_from_the_config_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "gateway.yaml"
    config.write_text("model: /m\nroutes:\n  support-bot:\n    variants: {pku: 90, cat: 10}\n    sticky: header\n"
                      "    blind: true\nfeedback_db: /tmp/f.sqlite3\nfeedback_store_text: true\n")
    settings = Settings.load(config)
    route = settings.routes["support-bot"]
    assert (route.variants, route.sticky, route.blind) == ({"pku": 90.0, "cat": 10.0}, "header", True)
    assert (settings.feedback_db, settings.feedback_store_text) == ("/tmp/f.sqlite3", True)
