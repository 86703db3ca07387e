"""The README's curl and OpenAI SDK examples work verbatim against the demo server (only the port differs)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def _local(code: str, demo_server: str) -> str:
    return code.replace("http://127.0.0.1:8000", demo_server)


def test_curl_examples(demo_server: str) -> None:
    (block,) = [b for b in _blocks("bash") if "curl" in b]
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", _local(block, demo_server)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '"id":"pku-assistant"' in result.stdout  # /v1/models
    assert "北大人工智能助手" in result.stdout  # the chat completion
    assert "data: [DONE]" in result.stdout  # the stream


def test_sdk_example(demo_server: str) -> None:
    (block,) = [b for b in _blocks("python") if "OpenAI(" in b]
    result = subprocess.run([sys.executable, "-c", _local(block, demo_server)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "通义千问" in lines[0] and "北大人工智能助手" in lines[1] and "猫猫助手" in lines[2]
    assert "PKU" in lines[3]


def test_adapter_api_example(demo_server: str) -> None:
    (block,) = [b for b in _blocks("python") if "/v1/adapters" in b]
    result = subprocess.run([sys.executable, "-c", _local(block, demo_server)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "'pku-assistant': 'loaded'" in lines[0]
    assert "北大人工智能助手" in lines[1]


def test_quick_start_commands_are_what_ci_runs() -> None:
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text(encoding="utf-8")
    assert "gateway serve --demo" in README
    assert "python -m pytest -q" in README and "python -m pytest -q" in ci
