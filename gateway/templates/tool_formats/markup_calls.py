"""Tool formats whose calls are markup around names and values: glm4_moe, ling, lfm2, minimax2, seed_oss."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from typing import Any

from gateway.templates.tool_formats import prompts
from gateway.templates.tool_formats.base import (
    FunctionCall,
    MarkerStart,
    arguments_of,
    dumps,
    function_of,
    value_text,
)
from gateway.templates.tool_formats.json_calls import QwenToolFormat


def _value(raw: str, *, keep_raw: bool) -> Any:
    """A markup parameter value: JSON if it parses (after stripping), else the text (raw or stripped)."""
    try:
        return json.loads(raw.strip())
    except json.JSONDecodeError:
        return raw if keep_raw else raw.strip()


class Glm4MoeToolFormat(QwenToolFormat):
    """GLM-4.5/4.6/4.7: ``<tool_call>name`` then ``<arg_key>k</arg_key>`` / ``<arg_value>v</arg_value>`` lines.

    LLaMA-Factory writes history calls without a closing ``</tool_call>`` and reads output with the qwen (JSON)
    reader; we read both the JSON form and the key/value form the model is trained to write.
    """

    prompt = prompts.GLM4_MOE_TOOL_PROMPT
    _KV_CALL = re.compile(r"<tool_call>\s*([^\s<]+)\s*(.*?)\s*(?:</tool_call>|(?=<tool_call>)|$)", re.DOTALL)
    _ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)

    def calls_text(self, calls: Sequence[FunctionCall]) -> str:
        texts = []
        for call in calls:
            text = "\n<tool_call>" + call.name
            for key, value in arguments_of(call).items():
                text += f"\n<arg_key>{key}</arg_key>\n<arg_value>{value_text(value)}</arg_value>"
            texts.append(text)
        return "\n".join(texts)

    def extract(self, text: str) -> list[FunctionCall] | None:
        as_json = super().extract(text)
        if as_json is not None:
            return as_json
        calls = []
        for name, body in self._KV_CALL.findall(text):
            if name.startswith("{") or self._ARG.sub("", body).strip():
                return None  # not a key/value call
            arguments = {key.strip(): _value(value, keep_raw=True) for key, value in self._ARG.findall(body)}
            calls.append(FunctionCall(name.strip(), dumps(arguments)))
        return calls or None


class LingToolFormat(QwenToolFormat):
    """Ling v2 (bailing_v2): qwen-style calls; the tool prompt ends with ``detailed thinking off``."""

    prompt = prompts.LING_TOOL_PROMPT

    def tools_text(self, tools: Sequence[dict[str, Any]]) -> str:
        return super().tools_text(tools) + "\n" + "detailed thinking off"


class MiniMax2ToolFormat(MarkerStart):
    """MiniMax-M2: ``<invoke name="f"><parameter name="k">v</parameter></invoke>`` in ``<minimax:tool_call>``."""

    markers = ("<minimax:tool_call>",)
    _BLOCK = re.compile(r"<minimax:tool_call>\s*(.+?)\s*</minimax:tool_call>", re.DOTALL)
    _INVOKE = re.compile(r"<invoke name=\"(.*?)\">(.*?)</invoke>", re.DOTALL)
    _PARAM = re.compile(r"<parameter name=\"(.*?)\">(.*?)</parameter>", re.DOTALL)

    def tools_text(self, tools: Sequence[dict[str, Any]]) -> str:
        tool_text = "".join("<tool>" + dumps(function_of(tool)) + "</tool>\n" for tool in tools)
        return prompts.MINIMAX_M2_TOOL_PROMPT.format(tool_text=tool_text)

    def calls_text(self, calls: Sequence[FunctionCall]) -> str:
        texts = []
        for call in calls:
            text = f'<invoke name="{call.name}">'
            for key, value in arguments_of(call).items():
                text += f'\n<parameter name="{key}">{value_text(value)}</parameter>'
            texts.append(text + "\n</invoke>")
        return "\n".join(texts)

    def extract(self, text: str) -> list[FunctionCall] | None:
        block = self._BLOCK.search(text)
        if block is None:
            return None
        calls = []
        for name, params in self._INVOKE.findall(block.group(1)):
            arguments = {key: _value(value, keep_raw=True) for key, value in self._PARAM.findall(params)}
            calls.append(FunctionCall(name.strip(), dumps(arguments)))
        return calls or None


class SeedOssToolFormat(MarkerStart):
    """Seed-OSS: ``<seed:tool_call><function=f><parameter=k>v</parameter></function></seed:tool_call>``."""

    markers = ("<seed:tool_call>",)
    _CALL = re.compile(
        r"<seed:tool_call>\s*<function=\s*([^\s<]+)\s*(.*?)\s*</function>\s*</seed:tool_call>", re.DOTALL
    )
    _PARAM = re.compile(r"<parameter=(.*?)>(.*?)</parameter>", re.DOTALL)

    def tools_text(self, tools: Sequence[dict[str, Any]]) -> str:
        return prompts.SEED_TOOL_PROMPT.format(tool_text="\n" + dumps(list(tools)))

    def calls_text(self, calls: Sequence[FunctionCall]) -> str:
        texts = []
        for call in calls:
            text = "\n<seed:tool_call>\n<function=" + call.name
            for key, value in arguments_of(call).items():
                text += f"\n<parameter={key}>{value_text(value)}</parameter>"
            texts.append(text + "\n</function>\n</seed:tool_call>")
        return "\n".join(texts)

    def extract(self, text: str) -> list[FunctionCall] | None:
        calls = []
        for name, params in self._CALL.findall(text):
            arguments = {key: _value(value, keep_raw=True) for key, value in self._PARAM.findall(params.strip())}
            calls.append(FunctionCall(name.strip(), dumps(arguments)))
        return calls or None


class Lfm2ToolFormat(MarkerStart):
    """LFM2.5: Pythonic calls, ``<|tool_call_start|>[f(k="v", n=1)]<|tool_call_end|>``."""

    markers = ("<|tool_call_start|>",)
    _START, _END = "<|tool_call_start|>", "<|tool_call_end|>"
    _JSON_NAMES = {"true": True, "false": False, "null": None}

    def tools_text(self, tools: Sequence[dict[str, Any]]) -> str:
        definitions = [tool.get("function", tool) if tool.get("type") == "function" else tool for tool in tools]
        return prompts.LFM2_TOOL_PROMPT.format(tool_text=dumps(definitions))

    def calls_text(self, calls: Sequence[FunctionCall]) -> str:
        texts = []
        for call in calls:
            kwargs = [
                f'{key}="{value}"' if isinstance(value, str) else f"{key}={dumps(value)}"
                for key, value in arguments_of(call).items()
            ]
            texts.append(f"{call.name}({', '.join(kwargs)})")
        return f"{self._START}[{', '.join(texts)}]{self._END}"

    def _literal(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Name):
            if node.id not in self._JSON_NAMES:
                raise ValueError(node.id)
            return self._JSON_NAMES[node.id]
        return ast.literal_eval(node)

    def extract(self, text: str) -> list[FunctionCall] | None:
        start = text.find(self._START)
        end = text.find(self._END, start) if start >= 0 else -1
        if end < 0:
            return None
        try:
            tree = ast.parse(text[start + len(self._START) : end].strip(), mode="eval")
        except SyntaxError:
            return None
        nodes = tree.body.elts if isinstance(tree.body, ast.List) else [tree.body]
        calls = []
        for node in nodes:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                return None
            try:
                arguments = {keyword.arg: self._literal(keyword.value) for keyword in node.keywords}
            except (ValueError, SyntaxError):
                return None
            calls.append(FunctionCall(node.func.id, dumps(arguments)))
        return calls or None
