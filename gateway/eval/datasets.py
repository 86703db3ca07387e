"""LLaMA-Factory's dataset formats, read as its converters read them, into chat requests with a label.

A dataset is described as in LLaMA-Factory's ``dataset_info.json``: ``formatting`` (alpaca or sharegpt),
``columns`` (prompt, query, response, history, messages, system, tools) and, for sharegpt, ``tags`` (role_tag,
content_tag, user_tag, assistant_tag, observation_tag, function_tag, system_tag), with LLaMA-Factory's defaults.
Conversion follows ``llamafactory.data.converter``:

- alpaca: the history pairs become user/assistant turns; the user turn is ``prompt + "\\n" + query`` (each part
  only if non-empty); the label is the ``response`` column; system and tools come from their columns.
- sharegpt: a first message with the system tag is the system prompt (else the system column); roles must
  alternate user|observation, assistant|function; an odd number of turns or a wrong role makes the example
  malformed, and LLaMA-Factory skips it (so do we, counting it); the last turn is the label.

Then each example becomes an OpenAI chat: a function turn (a JSON call or list of calls) becomes an assistant
message with ``tool_calls``, an observation turn a ``tool`` message, LLaMA-Factory tool definitions (a JSON list of
``{"name", "description", "parameters"}``) OpenAI ``tools``, which is what the gateway renders back into the same
prompt LLaMA-Factory trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

DATA_CONFIG = "dataset_info.json"
FILE_TYPES = {"json": "json", "jsonl": "json"}  # LLaMA-Factory reads both with datasets' json loader


class DatasetError(ValueError):
    """A dataset cannot be read or described; the message is a sentence for the user."""


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of ``dataset_info.json`` (LLaMA-Factory's ``DatasetAttr``, local files only), with its defaults."""

    file: Path
    formatting: Literal["alpaca", "sharegpt"] = "alpaca"
    num_samples: int | None = None
    # columns
    system: str | None = None
    tools: str | None = None
    prompt: str | None = "instruction"
    query: str | None = "input"
    response: str | None = "output"
    history: str | None = None
    messages: str | None = "conversations"
    # sharegpt tags
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    system_tag: str | None = "system"


@dataclass(frozen=True)
class Example:
    """One evaluation example: the chat to send, the tools offered, and the reference answer."""

    messages: list[dict[str, Any]]
    label: str
    tools: list[dict[str, Any]] | None = None
    source: str = ""  # "FILE#INDEX", for messages about this example


_COLUMNS = ("prompt", "query", "response", "history", "messages", "system", "tools")
_TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
_UNSUPPORTED = {
    "hf_hub_url": "hub datasets cannot be downloaded here; point file_name at a local copy",
    "ms_hub_url": "hub datasets cannot be downloaded here; point file_name at a local copy",
    "om_hub_url": "hub datasets cannot be downloaded here; point file_name at a local copy",
    "script_url": "loading scripts are not run; point file_name at the data file",
    "cloud_file_name": "cloud files are not fetched; point file_name at a local copy",
}


def spec_from_info(name: str, info: dict[str, Any], dataset_dir: Path) -> DatasetSpec:
    """The spec of dataset ``name`` from a parsed ``dataset_info.json`` in ``dataset_dir``."""
    if name not in info:
        known = ", ".join(sorted(info)) or "none"
        raise DatasetError(f"dataset {name!r} is not in {dataset_dir / DATA_CONFIG} (it has: {known})")
    entry = info[name]
    for key, why in _UNSUPPORTED.items():
        if key in entry:
            raise DatasetError(f"dataset {name!r} uses {key}: {why}")
    if "file_name" not in entry:
        raise DatasetError(f"dataset {name!r} in {dataset_dir / DATA_CONFIG} has no file_name")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise DatasetError(f"dataset {name!r}: formatting {formatting!r} is not supported (alpaca or sharegpt)")
    if entry.get("ranking"):
        raise DatasetError(f"dataset {name!r} is a ranking (preference) dataset; eval needs one answer per example")
    columns = entry.get("columns", {})
    for column in ("images", "videos", "audios", "chosen", "rejected", "kto_tag"):
        if columns.get(column):
            raise DatasetError(f"dataset {name!r} maps the {column!r} column, which text eval does not support")
    values: dict[str, Any] = {"file": dataset_dir / entry["file_name"], "formatting": formatting,
                              "num_samples": entry.get("num_samples")}
    # As LLaMA-Factory's DatasetAttr.join: a "columns" block sets every column (absent ones to None), a "tags" block
    # every tag.
    if "columns" in entry:
        values.update({c: columns.get(c) for c in _COLUMNS})
    if "tags" in entry:
        values.update({t: entry["tags"].get(t) for t in _TAGS})
    return DatasetSpec(**values)


def specs_from_dir(names: str, dataset_dir: Path) -> list[DatasetSpec]:
    """Specs for comma-separated dataset ``names`` (as LLaMA-Factory's ``eval_dataset``) in ``dataset_dir``."""
    path = dataset_dir / DATA_CONFIG
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from exc
    return [spec_from_info(n.strip(), info, dataset_dir) for n in names.split(",") if n.strip()]


def spec_for_file(file: Path, formatting: str | None = None) -> DatasetSpec:
    """A data file given without ``dataset_info.json``: LLaMA-Factory's defaults; sharegpt when records hold
    ``conversations`` (unless ``formatting`` says)."""
    if formatting is None:
        records = _records(file, 1)
        formatting = "sharegpt" if records and "conversations" in records[0] else "alpaca"
    if formatting not in ("alpaca", "sharegpt"):
        raise DatasetError(f"formatting {formatting!r} is not supported (alpaca or sharegpt)")
    return DatasetSpec(file=file, formatting=formatting)  # type: ignore[arg-type]


def read_examples(spec: DatasetSpec, max_samples: int | None = None) -> tuple[list[Example], int]:
    """The examples of one dataset, and how many malformed ones were skipped (as LLaMA-Factory skips them).

    ``num_samples`` (from ``dataset_info.json``) and ``max_samples`` both keep the first N records; LLaMA-Factory
    draws ``num_samples`` at random, we take the first ones so that runs compare.
    """
    limit = min((n for n in (spec.num_samples, max_samples) if n is not None), default=None)
    examples, skipped = [], 0
    for index, record in enumerate(_records(spec.file, limit)):
        source = f"{spec.file.name}#{index}"
        if not isinstance(record, dict):
            raise DatasetError(f"{source}: a record must be a JSON object")
        try:
            turns = _alpaca(spec, record) if spec.formatting == "alpaca" else _sharegpt(spec, record)
        except DatasetError as exc:
            raise DatasetError(f"{source}: {exc}") from None
        if turns is None:
            skipped += 1
            continue
        system, chat, label = turns
        messages = [{"role": "system", "content": system}] if system else []
        messages += [_openai_message(role, content, source) for role, content in chat]
        examples.append(Example(messages=messages, label=label, tools=_tools(_get(record, spec.tools), source),
                                source=source))
    return examples, skipped


# --- files --------------------------------------------------------------------------------------------------------


def _data_files(path: Path) -> list[Path]:
    """LLaMA-Factory's ``file_name`` may be a file or a folder of files of one type."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DatasetError(f"{path} holds no data files")
    elif path.is_file():
        files = [path]
    else:
        raise DatasetError(f"no dataset file at {path}")
    kinds = {p.suffix.lstrip(".") for p in files}
    other = sorted(kinds - FILE_TYPES.keys())
    if other:
        raise DatasetError(f"{path}: eval reads .json and .jsonl files, not {', '.join(other)}")
    return files


def _records(path: Path, limit: int | None) -> list[Any]:
    records: list[Any] = []
    for file in _data_files(path):
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise DatasetError(f"cannot read {file}: {exc.strerror}") from exc
        records.extend(_parse(file, text))
        if limit is not None and len(records) >= limit:
            return records[:limit]
    return records


def _parse(file: Path, text: str) -> list[Any]:
    """A JSON array, a single JSON object holding one, or JSON lines (datasets' json loader accepts all three)."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{file} is not valid JSON: {exc}") from exc
        return list(data)
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{file}, line {number}: not valid JSON ({exc.msg})") from exc
    return records


# --- LLaMA-Factory's converters -------------------------------------------------------------------------------------

Turns = tuple[str, list[tuple[str, str]], str]  # system, [(role, content)], label


def _get(record: dict[str, Any], column: str | None) -> Any:
    return record.get(column) if column else None


def _alpaca(spec: DatasetSpec, record: dict[str, Any]) -> Turns:
    chat: list[tuple[str, str]] = []
    history = _get(record, spec.history)
    if isinstance(history, list):
        for turn in history:
            if not (isinstance(turn, list) and len(turn) == 2):
                raise DatasetError(f"the {spec.history!r} column must hold [prompt, response] pairs, not {turn!r}")
            chat += [("user", turn[0]), ("assistant", turn[1])]
    query = [v for v in (_get(record, spec.prompt), _get(record, spec.query)) if v]
    chat.append(("user", "\n".join(query)))
    response = _get(record, spec.response)
    label = response if isinstance(response, str) else ""  # an unsupervised example: nothing to compare with
    return _get(record, spec.system) or "", chat, label


def _sharegpt(spec: DatasetSpec, record: dict[str, Any]) -> Turns | None:
    roles = {spec.user_tag: "user", spec.assistant_tag: "assistant", spec.observation_tag: "observation",
             spec.function_tag: "function", spec.system_tag: "system"}
    accepted = ((spec.user_tag, spec.observation_tag), (spec.assistant_tag, spec.function_tag))
    messages = _get(record, spec.messages) or []
    if not (isinstance(messages, list) and all(isinstance(m, dict) for m in messages)):
        raise DatasetError(f"the {spec.messages!r} column must hold a list of messages (JSON objects)")
    if spec.system_tag and messages and messages[0].get(spec.role_tag) == spec.system_tag:
        system, messages = messages[0].get(spec.content_tag), messages[1:]
    else:
        system = _get(record, spec.system) or ""
    aligned = []
    for turn, message in enumerate(messages):
        role = message.get(spec.role_tag)
        if role not in accepted[turn % 2]:
            return None
        aligned.append((roles[role], message.get(spec.content_tag)))
    if len(aligned) % 2 != 0 or not aligned:
        return None
    return system or "", aligned[:-1], aligned[-1][1] or ""


def _openai_message(role: str, content: str, source: str) -> dict[str, Any]:
    if role == "observation":
        return {"role": "tool", "content": content}
    if role != "function":
        return {"role": role, "content": content}
    try:
        calls = json.loads(content)
    except (TypeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{source}: a function_call turn must hold JSON ({exc})") from exc
    calls = calls if isinstance(calls, list) else [calls]
    if not all(isinstance(c, dict) and "name" in c for c in calls):
        raise DatasetError(f"{source}: a function_call turn must hold {{\"name\", \"arguments\"}} objects")
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{i}", "type": "function", "function": {"name": c["name"], "arguments": _arguments(c)}}
        for i, c in enumerate(calls)]}


def _arguments(call: dict[str, Any]) -> str:
    arguments = call.get("arguments", {})
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _tools(value: Any, source: str) -> list[dict[str, Any]] | None:
    """LLaMA-Factory's tools column (a JSON string of function definitions) as OpenAI tools."""
    if not value:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{source}: the tools column must hold a JSON list ({exc})") from exc
    value = value if isinstance(value, list) else [value]
    if not all(isinstance(t, dict) for t in value):
        raise DatasetError(f"{source}: the tools column must hold a JSON list of function definitions")
    return [t if t.get("type") == "function" and "function" in t else {"type": "function", "function": t}
            for t in value]


def load_examples(dataset: str, dataset_dir: Path | None = None, formatting: str | None = None,
                  max_samples: int | None = None) -> tuple[list[Example], int]:
    """``dataset`` as LLaMA-Factory names one: comma-separated names in ``dataset_dir/dataset_info.json``, or
    without ``dataset_dir`` a .json/.jsonl file (or folder of them). ``max_samples`` applies to each dataset, as in
    LLaMA-Factory. Returns the examples and how many malformed ones were skipped."""
    if dataset_dir is not None:
        if formatting is not None:
            raise DatasetError("--formatting is for a bare data file; with --dataset-dir, dataset_info.json says it")
        specs = specs_from_dir(dataset, dataset_dir)
        if not specs:
            raise DatasetError("--dataset names no dataset")
    else:
        if not Path(dataset).exists():
            raise DatasetError(f"no dataset file at {dataset} (to name a dataset of dataset_info.json, give "
                               "--dataset-dir)")
        specs = [spec_for_file(Path(dataset), formatting)]
    examples: list[Example] = []
    skipped = 0
    for spec in specs:
        more, dropped = read_examples(spec, max_samples)
        examples += more
        skipped += dropped
    return examples, skipped
