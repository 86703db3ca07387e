"""Tool formats: how a template describes tools in the system text, writes a call, and reads calls back.

Each format matches LLaMA-Factory 0.9.5's tool utils of the same name byte for byte when writing, because the model
was trained on exactly that text. Reading accepts what the format writes (and what LLaMA-Factory's extractor
accepts); ``call_start`` tells a streaming parser which part of the output so far may still become a call.

    fmt = tool_format("qwen")
    fmt.tools_text([{"name": "f", "description": "d", "parameters": {...}}])  # appended to the system text
    fmt.extract('<tool_call>\\n{"name": "f", "arguments": {}}\\n</tool_call>')  # [FunctionCall("f", "{}")]
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.templates.tool_formats.base import FunctionCall, ToolFormat
from gateway.templates.tool_formats.json_calls import (
    DefaultToolFormat,
    Glm4ToolFormat,
    Llama3ToolFormat,
    MiniMax1ToolFormat,
    MistralToolFormat,
    QwenToolFormat,
)
from gateway.templates.tool_formats.markup_calls import (
    Glm4MoeToolFormat,
    Lfm2ToolFormat,
    LingToolFormat,
    MiniMax2ToolFormat,
    SeedOssToolFormat,
)

TOOL_FORMATS: Mapping[str, ToolFormat] = {
    "default": DefaultToolFormat(),
    "glm4": Glm4ToolFormat(),
    "glm4_moe": Glm4MoeToolFormat(),
    "lfm2": Lfm2ToolFormat(),
    "ling": LingToolFormat(),
    "llama3": Llama3ToolFormat(),
    "minimax1": MiniMax1ToolFormat(),
    "minimax2": MiniMax2ToolFormat(),
    "mistral": MistralToolFormat(),
    "qwen": QwenToolFormat(),
    "seed_oss": SeedOssToolFormat(),
}


def tool_format(name: str) -> ToolFormat:
    """The tool format registered under ``name``; ``ValueError`` for an unknown one."""
    try:
        return TOOL_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown tool format {name!r}; known: {', '.join(sorted(TOOL_FORMATS))}") from None


__all__ = ["TOOL_FORMATS", "FunctionCall", "ToolFormat", "tool_format"]
