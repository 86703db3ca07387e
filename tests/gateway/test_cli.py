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
