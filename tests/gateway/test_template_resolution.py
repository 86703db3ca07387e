"""Which template a target gets (explicit → run files → adapter tokenizer → base configured → base tokenizer), and
models' own Jinja templates rendered as transformers renders them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gateway.errors import InvalidRequest
from gateway.templates import JinjaTemplate, SlotTemplate, TemplateResolutionError, resolve_template

# Small chat templates in the style of models' own (ChatML with tools and thinking; a strict one).
CHATML = (
    "{% if tools %}<|im_start|>system\n{{ messages[0]['content'] if messages[0]['role'] == 'system' else 'Tools' }}"
    "\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\nCall with <tool_call></tool_call>."
    "<|im_end|>\n{% endif %}"
    "{% for message in messages %}{% if not (tools and message['role'] == 'system') %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)
STRICT = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '[' + message['role'] | upper + '] ' + message['content'] | trim }}\n{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Be brief. {{ not a variable }}"},
    {"role": "user", "content": "你好 {% raw %}"},
    {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": "Weather?"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "天气", "parameters": {}}}]


def _write(folder: Path, name: str, data: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data) if name.endswith(".yaml") else json.dumps(data), encoding="utf-8")
    return path


def _transformers_render(source: str, messages: list[dict], **kwargs: object) -> str:
    render_jinja_template = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template
    rendered, _ = render_jinja_template([messages], chat_template=source, add_generation_prompt=True, **kwargs)
    return rendered[0]


@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_jinja_renders_like_transformers(thinking: bool | None, tools: list | None) -> None:
    template = JinjaTemplate("chatml", CHATML, eos_token="<|im_end|>")
    rendering = template.render(MESSAGES, tools, enable_thinking=thinking)
    kwargs = {"enable_thinking": thinking} if thinking is not None else {}
    assert rendering.prompt == _transformers_render(CHATML, MESSAGES, tools=tools, **kwargs)
    assert [s.kind for s in rendering.segments] == ["text"] and rendering.stop == ("<|im_end|>",)


def test_jinja_tokens_and_exceptions() -> None:
    template = JinjaTemplate("strict", STRICT, bos_token="<s>", eos_token="</s>")
    messages = MESSAGES[1:]
    expected = _transformers_render(STRICT, messages, bos_token="<s>", eos_token="</s>")
    assert template.render(messages).prompt == expected
    assert template.render(messages, bos_token="<B>").prompt.startswith("<B>[USER]")
    with pytest.raises(InvalidRequest, match="System role not supported"):
        template.render(MESSAGES)


def test_jinja_output_parser_follows_the_template() -> None:
    template = JinjaTemplate("chatml", CHATML, eos_token="<|im_end|>")
    parser = template.output_parser(tools_enabled=True)  # the prompt opened the thought
    parser.feed("weigh it\n</think>\n\nOK <tool_call>\n")
    parser.feed('{"name": "get_weather", "arguments": {}}\n</tool_call>')
    final = parser.finish()
    assert [c.name for c in final.tool_calls] == ["get_weather"]
    closed = template.output_parser(tools_enabled=False, enable_thinking=False)
    assert closed.feed("Plain.").content == "Plain."
    strict = JinjaTemplate("strict", STRICT).output_parser(tools_enabled=True)
    assert strict.feed("<think>x</think>").content == "<think>x</think>"


def test_explicit_wins(tmp_path: Path) -> None:
    _write(tmp_path / "run", "training_args.yaml", {"template": "llama3"})
    resolved = resolve_template(explicit="qwen", adapter_dir=tmp_path / "run", base_template="glm4")
    assert resolved.template.name == "qwen" and resolved.source.startswith("explicit")


@pytest.mark.parametrize("file_name", ["training_args.yaml", "llamaboard_config.yaml"])
def test_run_files(tmp_path: Path, file_name: str) -> None:
    key = "template" if file_name == "training_args.yaml" else "top.template"
    path = _write(tmp_path / "train_2025", file_name, {"stage": "sft", key: "qwen3"})
    _write(tmp_path / "train_2025", "tokenizer_config.json", {"chat_template": CHATML})
    resolved = resolve_template(adapter_dir=tmp_path / "train_2025", base_template="qwen")
    assert isinstance(resolved.template, SlotTemplate) and resolved.template.name == "qwen3"
    assert resolved.source == f"recorded by LLaMA-Factory in {path}"


def test_checkpoint_looks_at_its_run_folder(tmp_path: Path) -> None:
    path = _write(tmp_path / "run", "training_args.yaml", {"template": "deepseekr1"})
    (tmp_path / "run" / "checkpoint-500").mkdir()
    resolved = resolve_template(adapter_dir=tmp_path / "run" / "checkpoint-500")
    assert resolved.template.name == "deepseekr1" and str(path) in resolved.source
    _write(tmp_path / "other", "training_args.yaml", {"template": "qwen"})
    (tmp_path / "other" / "adapter").mkdir()
    with pytest.raises(TemplateResolutionError):  # only checkpoint-N folders look above themselves
        resolve_template(adapter_dir=tmp_path / "other" / "adapter")


@pytest.mark.parametrize("layout", ["config", "jinja_file", "named_list"])
def test_adapter_tokenizer_template(tmp_path: Path, layout: str) -> None:
    adapter = tmp_path / "adapter"
    config = {"eos_token": {"content": "<|im_end|>", "special": True}, "bos_token": None}
    if layout == "config":
        path = _write(adapter, "tokenizer_config.json", {**config, "chat_template": CHATML})
    elif layout == "named_list":
        named = [{"name": "tool_use", "template": STRICT}, {"name": "default", "template": CHATML}]
        path = _write(adapter, "tokenizer_config.json", {**config, "chat_template": named})
    else:
        _write(adapter, "tokenizer_config.json", config)
        path = adapter / "chat_template.jinja"
        path.write_text(CHATML, encoding="utf-8")
    resolved = resolve_template(adapter_dir=adapter, base_template="llama3")
    assert isinstance(resolved.template, JinjaTemplate)
    assert resolved.source == f"the adapter's tokenizer chat template in {path}"
    rendering = resolved.template.render(MESSAGES[1:2])
    assert rendering.prompt.endswith("<|im_start|>assistant\n<think>\n") and rendering.stop == ("<|im_end|>",)


def test_base_configured_then_base_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    _write(tmp_path / "base", "tokenizer_config.json", {"chat_template": STRICT, "eos_token": "</s>"})
    resolved = resolve_template(adapter_dir=tmp_path / "adapter", base_template="mistral", base_dir=tmp_path / "base")
    assert resolved.template.name == "mistral" and resolved.source == "the base model's configured template"
    resolved = resolve_template(adapter_dir=tmp_path / "adapter", base_dir=tmp_path / "base")
    assert isinstance(resolved.template, JinjaTemplate)
    assert resolved.source == f"the base tokenizer's chat template in {tmp_path / 'base' / 'tokenizer_config.json'}"


def test_nothing_found_or_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(TemplateResolutionError, match="--template"):
        resolve_template(adapter_dir=tmp_path, base_dir=tmp_path)
    _write(tmp_path / "run", "training_args.yaml", {"template": "qwen2_vl_custom"})
    with pytest.raises(TemplateResolutionError, match="qwen2_vl_custom"):
        resolve_template(adapter_dir=tmp_path / "run")
