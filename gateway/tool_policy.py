"""What a model does with a request's ``tools``: render them into the prompt, or serve the request as if it had none.

Open WebUI sends its ~36 built-in tools with every chat message (no ``tool_choice``). Rendered into a qwen system
prompt they take ~14,000 tokens, and a fine-tune trained without tools no longer sees the prompt it was trained on.
So each model has a policy:

- ``render``: the tools go into the prompt in the template's tool format and tool calls are parsed (as OpenAI does);
- ``ignore``: the prompt is rendered as if the request had no tools, nothing is parsed as a tool call, and the answer
  carries ``x-gateway-tools-ignored: <count>``; a ``tool_choice`` that forces a call is a 400 (it cannot be honoured);
- ``auto`` (the default): ``render`` for a model known to be trained with tools, else tools are rendered only when
  the request asks for them explicitly with ``tool_choice`` (``auto``, ``required`` or a function) and ignored
  otherwise. Known to be trained with tools: a base whose own tokenizer chat template handles ``tools`` (instruct
  models ship one when they were tuned for tool calls); an adapter whose LLaMA-Factory run records a dataset with a
  ``tools`` column (``training_args.yaml`` → ``dataset`` / ``dataset_dir`` → ``dataset_info.json``).

``tool_choice: "none"`` never offers the tools, whatever the policy (OpenAI semantics).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.errors import InvalidRequest
from gateway.settings import ToolPolicy
from gateway.templates.jinja_template import find_chat_template

log = logging.getLogger(__name__)

TOOLS_IGNORED_HEADER = "x-gateway-tools-ignored"
TRAINING_ARGS = "training_args.yaml"
_CHECKPOINT = re.compile(r"checkpoint-\d+")


@dataclass(frozen=True)
class ToolHandling:
    """A model's tool policy, and (for ``auto``) whether it is known to be trained with tools and how we know."""

    policy: ToolPolicy
    trained_with_tools: bool
    reason: str

    @property
    def summary(self) -> str:
        """When this model renders a request's tools, in words (shown by /v1/models)."""
        if self.policy == "render":
            return "tools are rendered (policy render)"
        if self.policy == "ignore":
            return "tools are ignored (policy ignore)"
        if self.trained_with_tools:
            return f"tools are rendered: trained with tools ({self.reason})"
        return f"tools are rendered only when the request sets tool_choice ({self.reason})"

    def offers_tools(self, tools: Sequence[Any] | None, tool_choice: Any) -> bool:
        """Whether the prompt of a request with these ``tools`` and ``tool_choice`` shows the tools."""
        if not tools or tool_choice == "none":
            return False
        if self.policy == "render":
            return True
        if self.policy == "ignore":
            if tool_choice not in (None, "auto"):
                raise InvalidRequest(
                    "tool_choice forces a tool call, but this model ignores tools (tool_policy: ignore); set its "
                    "tool policy to render (--tool-policy / --adapter-tool-policy NAME=render, or tool_policy: in "
                    "the config) to use tools with it",
                    param="tool_choice",
                )
            return False
        return self.trained_with_tools or tool_choice is not None


def _run_args(folder: Path) -> tuple[dict[str, Any], Path] | None:
    """``training_args.yaml`` of the run ``folder`` is (or of the run above a ``checkpoint-N``), and its path."""
    candidates = (folder, folder.parent) if _CHECKPOINT.fullmatch(folder.name) else (folder,)
    for candidate in candidates:
        path = candidate / TRAINING_ARGS
        if not path.is_file():
            continue
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None
        return (data, path) if isinstance(data, dict) else None
    return None


def recorded_tool_training(folder: Path) -> tuple[bool, Path] | None:
    """Whether the LLaMA-Factory run in ``folder`` trained on a dataset with a ``tools`` column, and the
    ``dataset_info.json`` that says so; ``None`` when the datasets cannot be found.

    ``dataset_dir`` is taken as given when absolute, else inside LLaMA-Factory's working folder, which is the run
    folder's path minus the recorded ``output_dir`` (``<cwd>/saves/<model>/lora/<run>``)."""
    found = _run_args(folder)
    if found is None:
        return None
    args, args_path = found
    datasets = [name.strip() for name in str(args.get("dataset") or "").split(",") if name.strip()]
    dataset_dir = Path(str(args.get("dataset_dir") or "data"))
    run = args_path.parent.resolve()
    if not dataset_dir.is_absolute():
        output = Path(str(args.get("output_dir") or "")).parts
        if not output or run.parts[-len(output):] != output:
            return None
        dataset_dir = Path(*run.parts[: -len(output)]) / dataset_dir
    info_path = dataset_dir / "dataset_info.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    entries = [info.get(name) for name in datasets] if isinstance(info, dict) else []
    if not entries or not all(isinstance(entry, dict) for entry in entries):
        return None
    return any("tools" in (entry.get("columns") or {}) for entry in entries if entry is not None), info_path


def resolve_tool_handling(policy: ToolPolicy | None, *, base_dir: Path | None,
                          adapter_dir: Path | None) -> ToolHandling:
    """The tool handling of a base (``adapter_dir is None``) or an adapter, under ``policy`` (``None``: auto)."""
    if policy in ("render", "ignore"):
        return ToolHandling(policy, policy == "render", "configured")
    if adapter_dir is not None:
        recorded = recorded_tool_training(adapter_dir)
        if recorded is None:
            return ToolHandling("auto", False, "no record of tools in its training data")
        with_tools, where = recorded
        return ToolHandling("auto", with_tools, f"{'a' if with_tools else 'no'} tools column in {where}")
    found = find_chat_template(base_dir) if base_dir is not None else None
    if found is not None and "tools" in found.source:
        return ToolHandling("auto", True, f"its chat template in {found.path} handles tools")
    return ToolHandling("auto", False, "its tokenizer has no chat template that handles tools")
