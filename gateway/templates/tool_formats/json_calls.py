"""Tool formats whose calls carry JSON: default (ReAct), glm4, llama3, minimax1, mistral, qwen."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from gateway.errors import InvalidRequest
from gateway.templates.tool_formats import prompts
from gateway.templates.tool_formats.base import (
    FunctionCall,
    MarkerStart,
    WholeOutputStart,
    arguments_of,
    dumps,
    function_of,
    wrapped,
)

_INVALID = object()


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _json_or_invalid(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _INVALID


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class DefaultToolFormat(MarkerStart):
    """ReAct style: ``Action: name`` / ``Action Input: {json}``, tools listed with their arguments."""

    markers = ("Action:",)
    _CALL = re.compile(r"Action:\s*([a-zA-Z0-9_]+)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", re.DOTALL)

    def tools_text(self, tools: Sequence[dict[str, Any]]) -> str:
        tool_text, names = "", []
        for tool in map(function_of, tools):
            parameters = _mapping(tool.get("parameters"))
            args = ""
            required_names = parameters.get("required")
            required_names = required_names if isinstance(required_names, list) else []
            for name, raw in _mapping(parameters.get("properties")).items():
                param = _mapping(raw)  # a schema may be `true`; LLaMA-Factory's code assumes objects and strings
                required = ", required" if name in required_names else ""
                values = param.get("enum")
                values = values if isinstance(values, list) else []
                enum = ", should be one of [{}]".format(", ".join(map(str, values))) if values else ""
                item_type = _mapping(param.get("items")).get("type", "")
                items = f", where each item should be {item_type}" if param.get("items") else ""
                args += f"  - {name} ({param.get('type', '')}{required}): {param.get('description', '')}{enum}{items}\n"
            tool_text += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n"
            tool_text += f"{args}\n"
            names.append(tool["name"])
        return prompts.DEFAULT_TOOL_PROMPT.format(tool_text=tool_text, tool_names=", ".join(names))

    def calls_text(self, calls: Sequence[FunctionCall]) -> str:
        return "\n".join(f"Action: {call.name}\nAction Input: {call.arguments}" for call in calls)

    def extract(self, text: str) -> list[FunctionCall] | None:
        calls = []
        for name, raw in self._CALL.findall(text):
            arguments = _json_or_invalid(raw.strip().strip('"').strip("`"))
            if arguments is _INVALID:
                return None
            calls.append(FunctionCall(name.strip(), dumps(arguments)))
        return calls or None


class Glm4ToolFormat(WholeOutputStart):
    """GLM-4: the call is the whole answer, ``name`` on the first line and the JSON arguments below it."""

    def call_start(self, text: str) -> int:
        return 0  # any first line may be a function name

    def tools_text(self, tools: Sequence[dict[str, Any]]) -> str:
        tool_text = ""
        for tool in map(function_of, tools):
            tool_text += prompts.GLM4_TOOL_ITEM.format(name=tool["name"], body=dumps(tool, indent=4))
        return prompts.GLM4_TOOL_PROMPT.format(tool_text=tool_text)

    def calls_text(self, calls: Sequence[FunctionCall]) -> str:
        if len(calls) > 1:
            raise InvalidRequest("this template (GLM-4 tool format) cannot make parallel tool calls", param="messages")
        return f"{calls[0].name}\n{calls[0].arguments}"

    def extract(self, text: str) -> list[FunctionCall] | None:
        if "\n" not in text:
            return None
        name, raw = text.split("\n", maxsplit=1)
        try:
            arguments = json.loads(raw.strip())
        except json.JSONDecodeError:
            return None
        return [FunctionCall(name, dumps(arguments))]


class _WholeJsonCalls(WholeOutputStart):
    """Calls written as one JSON object, or a list of them, making up the whole answer."""

    arguments_key = "arguments"

    def extract(self, text: str) -> list[FunctionCall] | None:
        try:
            parsed = json.loads(text.strip())
        except json.JSONDecodeError:
            return None
        items = parsed if isinstance(parsed, list) else [parsed]
        try:
            return [FunctionCall(item["name"], dumps(item[self.arguments_key])) for item in items] or None
        except (KeyError, TypeError):
            return None


class Llama3ToolFormat(_WholeJsonCalls):
    """Llama 3.x JSON tool calling (tools in the system message): ``{"name": ..., "parameters": {...}}``.

    The tool prompt carries today's date, as LLaMA-Factory writes it (``%d %b %Y``).
    """

    arguments_key = "parameters"

    def tools_text(self, tools: Sequence[dict[str, Any]]) -> str:
        tool_text = "".join(dumps(wrapped(tool), indent=4) + "\n\n" for tool in tools)
        return prompts.LLAMA3_TOOL_PROMPT.format(date=datetime.now().strftime("%d %b %Y"), tool_text=tool_text)

    def calls_text(self, calls: Sequence[FunctionCall]) -> str:
        objects = [{"name": call.name, "parameters": arguments_of(call)} for call in calls]
        return dumps(objects[0] if len(objects) == 1 else objects)


class MistralToolFormat(_WholeJsonCalls):
    """Mistral v0.3: ``[AVAILABLE_TOOLS] [...][/AVAILABLE_TOOLS]``; calls as a JSON list (after ``[TOOL_CALLS]``)."""

    openers = ("{", "[")
    _CALLS_TOKEN = "[TOOL_CALLS]"

    def tools_text(self, tools: Sequence[dict[str, Any]]) -> str:
        return "[AVAILABLE_TOOLS] " + dumps([wrapped(tool) for tool in tools]) + "[/AVAILABLE_TOOLS]"

    def calls_text(self, calls: Sequence[FunctionCall]) -> str:
        return dumps([{"name": call.name, "arguments": arguments_of(call)} for call in calls])

    def extract(self, text: str) -> list[FunctionCall] | None:
        stripped = text.strip()
        if stripped.startswith(self._CALLS_TOKEN):  # kept when special tokens are not skipped in decoding
            stripped = stripped[len(self._CALLS_TOKEN) :]
        return super().extract(stripped)


class QwenToolFormat(MarkerStart):
    """Qwen 2.5: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` per call, at the end."""

    markers = ("<tool_call>",)
    prompt = prompts.QWEN_TOOL_PROMPT
    _CALL = re.compile(r"<tool_call>(.+?)</tool_call>(?=\s*<tool_call>|\s*$)", re.DOTALL)

    def tools_text(self, tools: Sequence[dict[str, Any]]) -> str:
        return self.prompt.format(tool_text="".join("\n" + dumps(wrapped(tool)) for tool in tools))

    def calls_text(self, calls: Sequence[FunctionCall]) -> str:
        texts = [dumps({"name": call.name, "arguments": arguments_of(call)}) for call in calls]
        return "\n".join(f"<tool_call>\n{text}\n</tool_call>" for text in texts)

    def extract(self, text: str) -> list[FunctionCall] | None:
        calls = []
        for raw in self._CALL.findall(text):
            call = _json_or_none(raw.strip())
            if not isinstance(call, dict) or "name" not in call or "arguments" not in call:
                return None
            calls.append(FunctionCall(call["name"], dumps(call["arguments"])))
        return calls or None


class MiniMax1ToolFormat(MarkerStart):
    """MiniMax-M1: one JSON object per line inside ``<tool_calls>...</tool_calls>``."""

    markers = ("<tool_calls>",)
    _BLOCK = re.compile(r"<tool_calls>\s*(.+?)\s*</tool_calls>", re.DOTALL)

    def tools_text(self, tools: Sequence[dict[str, Any]]) -> str:
        tool_text = "".join(dumps(function_of(tool)) + "\n" for tool in tools)
        return prompts.MINIMAX_M1_TOOL_PROMPT.format(tool_text=tool_text)

    def calls_text(self, calls: Sequence[FunctionCall]) -> str:
        lines = [dumps({"name": call.name, "arguments": arguments_of(call)}) for call in calls]
        return "<tool_calls>\n" + "\n".join(lines) + "\n</tool_calls>"

    def extract(self, text: str) -> list[FunctionCall] | None:
        block = self._BLOCK.search(text)
        if block is None:
            return None
        calls = []
        for line in block.group(1).split("\n"):
            call = _json_or_none(line.strip()) if line.strip() else None
            if isinstance(call, dict) and "name" in call and "arguments" in call:
                calls.append(FunctionCall(call["name"], dumps(call["arguments"])))
        return calls or None
