"""Tool formats: how a template describes tools in the system text, writes a call, and how calls are read back.

Each format matches LLaMA-Factory's tool utils of the same name, byte for byte, because the model was trained on
exactly that text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class FunctionCall:
    name: str
    arguments: str  # JSON text


class ToolFormat(Protocol):
    def tools_text(self, tools: Sequence[dict[str, Any]]) -> str: ...

    def calls_text(self, calls: Sequence[FunctionCall]) -> str: ...

    def extract(self, text: str) -> list[FunctionCall] | None:
        """The calls in a model's output, or ``None`` when it holds none (then it is plain content)."""
        ...


def _wrapped(tool: dict[str, Any]) -> dict[str, Any]:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


class DefaultToolFormat:
    PROMPT = (
        "You have access to the following tools:\n{tool_text}"
        "Use the following format if using a tool:\n"
        "```\n"
        "Action: tool name (one of [{tool_names}])\n"
        "Action Input: the input to the tool, in a JSON format representing the kwargs "
        '(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n'
        "```\n"
    )
    _CALL = re.compile(r"Action:\s*([a-zA-Z0-9_]+)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", re.DOTALL)

    def tools_text(self, tools: Sequence[dict[str, Any]]) -> str:
        tool_text, names = "", []
        for tool in tools:
            tool = tool.get("function", "") if tool.get("type") == "function" else tool
            params = ""
            parameters = tool["parameters"]
            for name, param in parameters["properties"].items():
                required = ", required" if name in parameters.get("required", []) else ""
                enum = ", should be one of [{}]".format(", ".join(param["enum"])) if param.get("enum") else ""
                items = ", where each item should be {}".format(param["items"].get("type", "")) if param.get("items") else ""
                params += f"  - {name} ({param.get('type', '')}{required}): {param.get('description', '')}{enum}{items}\n"
            tool_text += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{params}\n"
            names.append(tool["name"])
        return self.PROMPT.format(tool_text=tool_text, tool_names=", ".join(names))

    def calls_text(self, calls: Sequence[FunctionCall]) -> str:
        return "\n".join(f"Action: {c.name}\nAction Input: {c.arguments}" for c in calls)

    def extract(self, text: str) -> list[FunctionCall] | None:
        matches = self._CALL.findall(text)
        if not matches:
            return None
        calls = []
        for name, raw in matches:
            raw = raw.strip().strip('"').strip("```")
            try:
                calls.append(FunctionCall(name.strip(), json.dumps(json.loads(raw), ensure_ascii=False)))
            except json.JSONDecodeError:
                return None
        return calls


class QwenToolFormat:
    PROMPT = (
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, '
        '"arguments": <args-json-object>}}\n</tool_call>'
    )
    _CALL = re.compile(r"<tool_call>(.+?)</tool_call>(?=\s*<tool_call>|\s*$)", re.DOTALL)

    def tools_text(self, tools: Sequence[dict[str, Any]]) -> str:
        tool_text = "".join("\n" + json.dumps(_wrapped(tool), ensure_ascii=False) for tool in tools)
        return self.PROMPT.format(tool_text=tool_text)

    def calls_text(self, calls: Sequence[FunctionCall]) -> str:
        texts = [json.dumps({"name": c.name, "arguments": json.loads(c.arguments)}, ensure_ascii=False) for c in calls]
        return "\n".join(f"<tool_call>\n{text}\n</tool_call>" for text in texts)

    def extract(self, text: str) -> list[FunctionCall] | None:
        matches = self._CALL.findall(text)
        if not matches:
            return None
        calls = []
        for raw in matches:
            try:
                call = json.loads(raw.strip())
            except json.JSONDecodeError:
                return None
            if not isinstance(call, dict) or "name" not in call or "arguments" not in call:
                return None
            calls.append(FunctionCall(call["name"], json.dumps(call["arguments"], ensure_ascii=False)))
        return calls


TOOL_FORMATS: dict[str, ToolFormat] = {
    "default": DefaultToolFormat(),
    "qwen": QwenToolFormat(),
}


def tool_format(name: str) -> ToolFormat:
    try:
        return TOOL_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown tool format {name!r}") from None
