"""The README's curl and OpenAI SDK examples work verbatim against the demo server (only the port differs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def _local(code: str, demo_server: str) -> str:
    return code.replace("http://127.0.0.1:8000", demo_server)


def _run_bash(block: str) -> str:
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def _run_python(block: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_curl_examples(demo_server: str) -> None:
    first, render = [b for b in _blocks("bash") if "curl" in b]
    out = _run_bash(_local(first, demo_server))
    assert '"id":"pku-assistant"' in out  # /v1/models
    assert "北大人工智能助手" in out  # the chat completion
    assert "data: [DONE]" in out  # the stream
    rendered = json.loads(_run_bash(_local(render, demo_server)))
    assert rendered["template"] == "qwen3" and rendered["prompt"].endswith("<think>\n\n</think>\n\n")


def test_template_commands() -> None:
    (block,) = [b for b in _blocks("bash") if "gateway template" in b]
    out = _run_bash(block)
    assert "qwen3 (reasoning)" in out
    assert '"kind": "special"' in out and "<|start_header_id|>user" in out


def test_sdk_examples(demo_server: str) -> None:
    compare, tools = [b for b in _blocks("python") if "OpenAI(" in b]
    lines = _run_python(_local(compare, demo_server))
    assert "通义千问" in lines[0] and "北大人工智能助手" in lines[1] and "猫猫助手" in lines[2]
    assert "PKU" in lines[3]
    lines = _run_python(_local(tools, demo_server))
    assert lines[0].startswith("thoughts: ") and len(lines[0]) > len("thoughts: None")
    assert lines[1].startswith("answer: ") and "思考者" in lines[1]
    assert "get_weather" in lines[2] and "北京" in lines[2]


def test_adapter_api_example(demo_server: str) -> None:
    (block,) = [b for b in _blocks("python") if "/v1/adapters" in b]
    lines = _run_python(_local(block, demo_server))
    assert "'pku-assistant': 'loaded'" in lines[0]
    assert "北大人工智能助手" in lines[1]


def test_compare_example(demo_server: str) -> None:
    (block,) = [b for b in _blocks("python") if "/v1/compare" in b]
    lines = _run_python(_local(block, demo_server))
    assert lines[0].startswith("tiny-qwen ") and "通义千问" in lines[0] and lines[0].endswith("tok/s")
    assert lines[1].startswith("pku-assistant ") and "北大人工智能助手" in lines[1]
    assert "'model': 'pku-assistant'" in lines[2] and "'model': 'tiny-qwen'" in lines[2]
    assert "'model': 'pku-assistant'" in lines[3] and "'wins': 1" in lines[3]
    (serve,) = [b for b in _blocks("bash") if "--route" in b]
    assert "--route 'support-bot=pku-assistant:90,cat-assistant:10;sticky=user'" in serve


def test_quick_start_commands_are_what_ci_runs() -> None:
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text(encoding="utf-8")
    assert "gateway serve --demo" in README
    assert "python -m pytest -q" in README and "python -m pytest -q" in ci


def test_offline_eval_example(demo_server: str, tmp_path: Path) -> None:
    (block,) = [b for b in _blocks("bash") if "gateway eval" in b]
    # Run where the example writes its files (data/, saves/), with this checkout's code on the path.
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", _local(block, demo_server)], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                                 "PYTHONPATH": str(Path(__file__).parents[1])})
    assert result.returncode == 0, result.stderr
    assert "tiny-qwen" in result.stdout and "pku-assistant" in result.stdout and "report.html" in result.stdout
    scores = {m: json.loads((tmp_path / "saves" / "eval" / m / "predict_results.json").read_text())
              for m in ("tiny-qwen", "pku-assistant")}
    assert scores["pku-assistant"]["predict_rouge-l"] > scores["tiny-qwen"]["predict_rouge-l"]
    lines = (tmp_path / "saves" / "eval" / "pku-assistant" / "generated_predictions.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["predict"] == "我是北大人工智能助手，由北京大学开发。很高兴为你服务！"
    assert (tmp_path / "saves" / "eval" / "report.html").is_file()
