"""From a chat request to the ``OutputConstraint`` a backend enforces: ``response_format`` and forced tool calls.

* ``response_format: {"type": "json_object"}`` → any JSON object; ``{"type": "json_schema", "json_schema":
  {"schema": ...}}`` → a JSON value valid against the schema (``strict`` or not, the schema is enforced);
  ``{"type": "text"}`` or none → no constraint.
* ``tool_choice: "required"`` (one call of any of ``tools``) or ``{"type": "function", "function": {"name"}}`` (one
  call of that function) → one call written in the template's own tool format, whose arguments are valid against
  the function's ``parameters``; the output parser then returns it as ``tool_calls``. Formats covered: ``qwen``
  (``<tool_call>\\n{"name", "arguments"}\\n</tool_call>``: qwen, qwen3 and Qwen-style Jinja templates),
  ``minimax1`` and ``llama3``; a template with another format (or none) is refused with a 400 naming both.
  One call per answer (no parallel calls under forcing). The arguments hold the declared parameters only: objects
  with ``properties`` get ``additionalProperties: false`` unless the schema says otherwise.
* Reasoning templates: when the prompt leaves room for a thought (thinking on), the output may open with one
  thought block before the constrained part; with thinking off it starts constrained (see ``backends.structured``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from backends.base import OutputConstraint
from gateway.errors import InvalidRequest
from gateway.protocol.chat import ChatCompletionRequest, NamedToolChoice, ResponseFormatText, ToolDefinition
from gateway.registry import Target
from gateway.templates import OutputParser
from gateway.templates.tool_formats import ToolFormat
from gateway.templates.tool_formats.json_calls import Llama3ToolFormat, MiniMax1ToolFormat, QwenToolFormat

# Tool format → (text before the call, the key holding the arguments, text after the call).
_CALL_SHAPES: dict[type, tuple[str, str, str]] = {
    QwenToolFormat: ("<tool_call>\n", "arguments", "\n</tool_call>"),
    MiniMax1ToolFormat: ("<tool_calls>\n", "arguments", "\n</tool_calls>"),
    Llama3ToolFormat: ("", "parameters", ""),
}


def check_tool_choice(body: ChatCompletionRequest) -> None:
    """``tool_choice`` must name a function of ``tools``, and ``"required"`` needs tools."""
    choice = body.tool_choice
    names = [tool.function.name for tool in body.tools or ()]
    if choice == "required" and not names:
        raise InvalidRequest('tool_choice "required" needs at least one function in tools', param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        known = ", ".join(names) if names else "no functions"
        raise InvalidRequest(
            f"tool_choice names function {choice.function.name!r}, which is not in tools ({known})",
            param="tool_choice",
        )


def forced_functions(body: ChatCompletionRequest) -> list[ToolDefinition] | None:
    """The functions one of which the answer must call, or ``None`` when the model may answer freely."""
    choice = body.tool_choice
    if choice == "required":
        return list(body.tools or ())
    if isinstance(choice, NamedToolChoice):
        return [tool for tool in body.tools or () if tool.function.name == choice.function.name]
    return None


def output_constraint(target: Target, body: ChatCompletionRequest, prompt_text: str,
                      parser: OutputParser) -> OutputConstraint | None:
    """The constraint for this request's output (``None``: unconstrained). ``parser`` is the request's output
    parser: it knows the template's thought words and tool format."""
    check_tool_choice(body)
    thought = _thought_words(parser, prompt_text)
    functions = forced_functions(body)
    if functions is not None:
        if body.response_format is not None and not isinstance(body.response_format, ResponseFormatText):
            raise InvalidRequest("response_format cannot be combined with a forced tool_choice: the answer is a "
                                 "tool call", param="response_format")
        prefix, key, suffix = _call_shape(target, parser.tool_format)
        return OutputConstraint(_dumps(_call_schema(functions, key)), prefix=prefix, suffix=suffix, thought=thought,
                                param="tool_choice")
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        schema: dict[str, Any] = {"type": "object"}
    else:
        schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
    return OutputConstraint(_dumps(schema), thought=thought, param="response_format")


def _thought_words(parser: OutputParser, prompt_text: str) -> tuple[str, str] | None:
    """The thought words when the answer may begin with a thought: a reasoning template whose prompt does not
    already hold the (empty) thought."""
    words = parser.thought_words
    if words is None:
        return None
    if parser.in_thought:
        raise InvalidRequest("this template opens a thought in the prompt; structured output needs thinking off "
                             "(chat_template_kwargs.enable_thinking=false)", param="chat_template_kwargs")
    if prompt_text.rstrip().endswith(words[1].strip()):
        return None
    return words


def _call_shape(target: Target, fmt: ToolFormat | None) -> tuple[str, str, str]:
    shape = _CALL_SHAPES.get(type(fmt))
    if shape is None:
        covered = ", ".join(sorted(t.__name__.removesuffix("ToolFormat").lower() for t in _CALL_SHAPES))
        described = f"tool format {type(fmt).__name__}" if fmt is not None else "no tool format"
        raise InvalidRequest(
            f"tool_choice cannot force a call with template {target.template.name!r} ({described}); forcing covers "
            f"the {covered} formats. Use tool_choice \"auto\"",
            param="tool_choice",
        )
    return shape


def _call_schema(functions: Sequence[ToolDefinition], key: str) -> dict[str, Any]:
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.function.name},
                           key: _closed(tool.function.parameters or {"type": "object", "properties": {}})},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for tool in functions
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists ``properties`` and does not say:
    a forced call's arguments hold the function's parameters only (as OpenAI's strict function calling); left open,
    the grammar would let a model invent keys until ``max_tokens``."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) if key in ("items", "anyOf", "oneOf", "allOf") else value
              for key, value in schema.items()}
    if isinstance(schema.get("properties"), dict):
        closed["properties"] = {name: _closed(value) for name, value in schema["properties"].items()}
        closed.setdefault("additionalProperties", False)
    return closed


def _dumps(schema: dict[str, Any]) -> str:
    return json.dumps(schema, ensure_ascii=False, sort_keys=False)
