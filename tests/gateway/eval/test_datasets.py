"""LLaMA-Factory's dataset formats read as its converters read them (llamafactory/data/converter.py, parser.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.eval.datasets import DatasetError, load_examples

DATA = Path(__file__).parents[1] / "data" / "eval"


def _write(folder: Path, name: str, records: list[dict[str, Any]], info: dict[str, Any], lines: bool) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) if lines else json.dumps(records)
    (folder / name).write_text(text, encoding="utf-8")
    info_path = folder / "dataset_info.json"
    known = json.loads(info_path.read_text()) if info_path.exists() else {}
    info_path.write_text(json.dumps({**known, **info}))


def test_the_identity_set_is_alpaca_with_dataset_info() -> None:
    examples, skipped = load_examples("identity", DATA)
    assert len(examples) == 20 and skipped == 0
    assert examples[0].messages == [{"role": "user", "content": "你好，你是谁？"}]
    assert examples[0].label == "我是北大人工智能助手，由北京大学开发。很高兴为你服务！"
    assert examples[0].tools is None and examples[0].source == "identity.json#0"


@pytest.mark.parametrize("lines", [False, True], ids=["json", "jsonl"])
def test_alpaca_prompt_query_history_system(tmp_path: Path, lines: bool) -> None:
    records = [
        {"instruction": "Translate to French", "input": "cat", "output": "chat", "system": "Be brief.",
         "history": [["Hi", "Hello!"], ["Ready?", "Yes."]]},
        {"instruction": "Who are you?", "input": "", "output": "PKU Assistant"},  # empty input: no "\n"
        {"instruction": "", "input": "only the query", "output": "ok"},
        {"instruction": "no answer"},  # unsupervised: nothing to compare with, label ""
    ]
    _write(tmp_path, "a.jsonl" if lines else "a.json", records,
           {"a": {"file_name": "a.jsonl" if lines else "a.json", "columns": {
               "prompt": "instruction", "query": "input", "response": "output", "system": "system",
               "history": "history"}}}, lines)
    examples, _ = load_examples("a", tmp_path)
    assert examples[0].messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Ready?"}, {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Translate to French\ncat"},  # LLaMA-Factory's "prompt\nquery"
    ]
    assert examples[0].label == "chat"
    assert examples[1].messages == [{"role": "user", "content": "Who are you?"}]
    assert examples[2].messages == [{"role": "user", "content": "only the query"}]
    assert examples[3].label == ""


def test_alpaca_columns_mapping_renames_and_unsets(tmp_path: Path) -> None:
    # A "columns" block sets every column, as DatasetAttr.join does: "query" unmapped means no query column, so a
    # record's "input" is not read; "system" is read from "sys".
    records = [{"q": "Who are you?", "input": "ignored", "a": "PKU", "sys": "You are PKU."}]
    _write(tmp_path, "m.json", records,
           {"m": {"file_name": "m.json", "columns": {"prompt": "q", "response": "a", "system": "sys"}}}, False)
    (example,), _ = load_examples("m", tmp_path)
    assert example.messages == [{"role": "system", "content": "You are PKU."},
                                {"role": "user", "content": "Who are you?"}]
    assert example.label == "PKU"


TOOLS = [{"name": "get_weather", "description": "天气", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}, "required": ["city"]}}]


@pytest.mark.parametrize("lines", [False, True], ids=["json", "jsonl"])
def test_sharegpt_default_tags_system_tools_function_calls(tmp_path: Path, lines: bool) -> None:
    records = [
        {"conversations": [
            {"from": "system", "value": "你是助手。"},
            {"from": "human", "value": "北京天气？"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "北京"}},
                                                          ensure_ascii=False)},
            {"from": "observation", "value": "晴"},
            {"from": "gpt", "value": "北京今天晴。"},
        ], "tools": json.dumps(TOOLS, ensure_ascii=False)},
        {"conversations": [{"from": "human", "value": "1+1?"}, {"from": "gpt", "value": "2"},
                           {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}],
         "system": "from the column"},
    ]
    name = "s.jsonl" if lines else "s.json"
    _write(tmp_path, name, records,
           {"s": {"file_name": name, "formatting": "sharegpt",
                  "columns": {"messages": "conversations", "system": "system", "tools": "tools"}}}, lines)
    (first, second), skipped = load_examples("s", tmp_path)
    assert skipped == 0
    assert first.messages == [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_0", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
        {"role": "tool", "content": "晴"},
    ]
    assert first.label == "北京今天晴。"
    assert first.tools == [{"type": "function", "function": TOOLS[0]}]
    assert second.messages == [{"role": "system", "content": "from the column"}, {"role": "user", "content": "1+1?"},
                               {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"}]
    assert second.label == "4"


def test_sharegpt_tag_mapping_and_malformed_examples_skipped(tmp_path: Path) -> None:
    good = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                         {"role": "assistant", "content": "A"}]}
    records = [
        good,
        {"messages": [{"role": "user", "content": "Q"}]},  # odd number of turns
        {"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]},  # wrong order
        {"messages": [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q"}]},  # user twice
    ]
    _write(tmp_path, "o.jsonl", records, {"o": {
        "file_name": "o.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"}}}, True)
    examples, skipped = load_examples("o", tmp_path)
    assert skipped == 3
    assert [e.messages for e in examples] == [[{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]]
    assert examples[0].label == "A"


def test_several_datasets_samples_and_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.jsonl").write_text("".join(
            json.dumps({"instruction": f"q{i}{j}", "output": f"a{i}{j}"}) + "\n" for j in range(3)))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "parts": {"file_name": "parts"},
        "few": {"file_name": "parts/1.jsonl", "num_samples": 2},
    }))
    examples, _ = load_examples("parts, few", tmp_path)
    assert [e.label for e in examples] == ["a00", "a01", "a02", "a10", "a11", "a12", "a10", "a11"]
    examples, _ = load_examples("parts,few", tmp_path, max_samples=1)  # per dataset, as LLaMA-Factory
    assert [e.label for e in examples] == ["a00", "a10"]


def test_a_bare_file_uses_llama_factory_defaults(tmp_path: Path) -> None:
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Q", "input": "more", "output": "A"}]))
    (example,), _ = load_examples(str(alpaca))
    assert example.messages == [{"role": "user", "content": "Q\nmore"}] and example.label == "A"
    sharegpt = tmp_path / "s.jsonl"
    sharegpt.write_text(json.dumps({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}))
    (example,), _ = load_examples(str(sharegpt))
    assert example.messages == [{"role": "user", "content": "Q"}] and example.label == "A"


@pytest.mark.parametrize(("entry", "message"), [
    ({"hf_hub_url": "llamafactory/alpaca_en"}, "hub datasets cannot be downloaded"),
    ({"file_name": "x.json", "ranking": True}, "ranking"),
    ({"file_name": "x.json", "formatting": "openai"}, "not supported"),
    ({"file_name": "x.json", "columns": {"images": "images"}}, "'images'"),
    ({"file_name": "missing.json"}, "no dataset file"),
    ({"file_name": "x.csv"}, "no dataset file"),
])
def test_what_cannot_be_read_is_a_sentence(tmp_path: Path, entry: dict[str, Any], message: str) -> None:
    (tmp_path / "x.json").write_text("[]")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": entry}))
    with pytest.raises(DatasetError, match=message):
        load_examples("d", tmp_path)


def test_bad_files_name_the_place(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"instruction": "ok", "output": "a"}\n{not json\n')
    with pytest.raises(DatasetError, match="line 2"):
        load_examples(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DatasetError, match="not in .*dataset_info.json .*identity"):
        load_examples("nope", DATA)
    with pytest.raises(DatasetError, match="cannot read"):
        load_examples("identity", tmp_path)
    (tmp_path / "f.json").write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "Q"}, {"from": "function_call", "value": "not json"},
        {"from": "observation", "value": "R"}, {"from": "gpt", "value": "A"}]}]))
    with pytest.raises(DatasetError, match="f.json#0: a function_call turn must hold JSON"):
        load_examples(str(tmp_path / "f.json"), formatting="sharegpt")


def test_malformed_columns_name_the_example(tmp_path: Path) -> None:
    (tmp_path / "h.json").write_text(json.dumps([{"instruction": "Q", "output": "A", "history": [["only one"]]}]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"h": {"file_name": "h.json", "columns": {
        "prompt": "instruction", "response": "output", "history": "history"}}}))
    with pytest.raises(DatasetError, match=r"h.json#0: the 'history' column must hold \[prompt, response\] pairs"):
        load_examples("h", tmp_path)
    (tmp_path / "c.json").write_text(json.dumps([{"conversations": "not a list"}]))
    with pytest.raises(DatasetError, match="c.json#0: the 'conversations' column must hold a list"):
        load_examples(str(tmp_path / "c.json"))
