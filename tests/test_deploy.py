"""The deployment files stay true to the code: settings keys exist, paths the Dockerfile copies exist."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from gateway.settings import Settings

DEPLOY = Path(__file__).parents[1] / "deploy"


def test_example_settings_file_loads() -> None:
    settings = Settings.load(DEPLOY / "gateway.example.yaml")
    assert settings.template == "qwen" and len(settings.adapters) == 2


def test_kubernetes_config_map_holds_valid_settings(tmp_path: Path) -> None:
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "gateway.yaml").read_text()))
    (config_map,) = [d for d in documents if d["kind"] == "ConfigMap"]
    path = tmp_path / "gateway.yaml"
    path.write_text(config_map["data"]["gateway.yaml"])
    assert Settings.load(path).device == "cuda"


def test_dockerfile_copies_existing_paths() -> None:
    copies = re.findall(r"^COPY (\S+)", (DEPLOY / "Dockerfile").read_text(), flags=re.MULTILINE)
    for source in copies:
        assert (DEPLOY.parent / source).exists(), source
