"""``gateway template list`` and ``gateway template render`` (the typer app the main CLI mounts)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from gateway.templates import SlotTemplate, template_names
from gateway.templates.cli import template_app

REQUEST = {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "你好 {{content}}"}]}


def test_list() -> None:
    result = CliRunner().invoke(template_app, ["list"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(template_names())
    assert "qwen3 (reasoning)" in lines and "qwen" in lines


def test_render_prints_prompt_segments_and_stop() -> None:
    args = ["render", "llama2", "--bos-token", "<s>", "--eos-token", "</s>"]
    result = CliRunner().invoke(template_app, args, input=json.dumps(REQUEST))
    assert result.exit_code == 0, result.output
    output = json.loads(result.stdout)
    expected = SlotTemplate.named("llama2").render(REQUEST["messages"], bos_token="<s>", eos_token="</s>")
    assert output == {
        "prompt": expected.prompt,
        "segments": [{"kind": s.kind, "text": s.text} for s in expected.segments],
        "stop": ["</s>"],
    }
    assert output["segments"][0] == {"kind": "special", "text": "<s>"}


def test_render_no_thinking_and_tools() -> None:
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}
    request = {**REQUEST, "tools": [tool]}
    result = CliRunner().invoke(template_app, ["render", "qwen3", "--no-thinking"], input=json.dumps(request))
    output = json.loads(result.stdout)
    assert output["prompt"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert '{"type": "function", "function": {"name": "f"' in output["prompt"]
    assert output["stop"] == ["<|im_end|>"]


def test_unknown_template_exits_2_with_the_names() -> None:
    result = CliRunner().invoke(template_app, ["render", "nope"], input=json.dumps(REQUEST))
    assert result.exit_code == 2
    assert "nope" in result.stderr and "qwen3" in result.stderr.splitlines()


def test_bad_input() -> None:
    result = CliRunner().invoke(template_app, ["render", "qwen"], input="not json")
    assert result.exit_code == 2 and "stdin" in result.output
    bad_roles = {"messages": [{"role": "assistant", "content": "x"}]}
    result = CliRunner().invoke(template_app, ["render", "qwen"], input=json.dumps(bad_roles))
    assert result.exit_code == 1 and "cannot render" in result.stderr
