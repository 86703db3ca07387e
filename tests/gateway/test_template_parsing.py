"""Output parsing: reasoning_content, content and tool_calls, the same whatever pieces the output arrives in."""

from __future__ import annotations

import json
import random

import pytest

from gateway.templates import SlotTemplate, template_names
from gateway.templates.parsing import OutputParser, ParsedDelta
from gateway.templates.tool_formats import FunctionCall, tool_format

THINK = ("<think>\n", "\n</think>\n\n")
Result = tuple[str, str, list[tuple[str, str]]]


def _collect(deltas: list[ParsedDelta]) -> Result:
    return (
        "".join(d.reasoning_content for d in deltas),
        "".join(d.content for d in deltas),
        [(call.name, call.arguments) for d in deltas for call in d.tool_calls],
    )


def parse(parser: OutputParser, pieces: list[str]) -> Result:
    return _collect([parser.feed(piece) for piece in pieces] + [parser.finish()])


def chunkings(text: str, seed: int = 0) -> list[list[str]]:
    """The text whole, char by char, and in random pieces."""
    rng = random.Random(seed)
    result = [[text], list(text)]
    for _ in range(6):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8)))) if len(text) > 1 else []
        result.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return result


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("<think>\nplan\n</think>\n\nAnswer", ("plan", "Answer")),
        ("<think>\nline 1\n\nline 2\n\n</think>\n\nA", ("line 1\n\nline 2\n", "A")),
        ("<think>\n\n</think>\n\nA", ("", "A")),
        ("<think>tight</think>A", ("tight", "A")),
        ("  \n<think>\nx\n</think>\n\n", ("x", "")),
        ("No thought here", ("", "No thought here")),
        ("<thin", ("", "<thin")),
        ("<think>\nunfinished", ("unfinished", "")),
        ("Text then <think>\nnot a thought\n</think>", ("", "Text then <think>\nnot a thought\n</think>")),
    ],
)
def test_reasoning(output: str, expected: tuple[str, str]) -> None:
    for pieces in chunkings(output):
        assert parse(OutputParser(thought_words=THINK), pieces) == (*expected, [])


def test_thought_opened_by_the_prompt() -> None:
    output = "still thinking\n</think>\n\nThe answer"
    for pieces in chunkings(output):
        assert parse(OutputParser(thought_words=THINK, in_thought=True), pieces) == ("still thinking", "The answer", [])


def test_reasoning_streams_in_small_pieces_without_the_closing_newline() -> None:
    parser = OutputParser(thought_words=THINK)
    deltas = [parser.feed(c) for c in "<think>\nab\n"]
    assert "".join(d.reasoning_content for d in deltas) == "ab"  # the "\n" waits: it may belong to "\n</think>"
    assert parser.feed("</think>\n\nok") == ParsedDelta(content="ok")


def test_other_thought_words() -> None:
    spec = SlotTemplate.named("gpt_oss").spec
    output = "<|channel|>analysis<|message|>why<|end|><|start|>assistant<|channel|>final<|message|>Because."
    for pieces in chunkings(output):
        assert parse(OutputParser(thought_words=spec.thought_words), pieces) == ("why", "Because.", [])


def test_tool_calls_with_content_before_them() -> None:
    output = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    for pieces in chunkings(output):
        reasoning, content, calls = parse(OutputParser(tool_format=tool_format("qwen")), pieces)
        assert (reasoning, content) == ("", "Let me look.\n")
        assert calls == [("get_weather", json.dumps({"city": "北京"}, ensure_ascii=False))]


def test_content_streams_until_a_marker_may_start() -> None:
    parser = OutputParser(tool_format=tool_format("qwen"))
    assert parser.feed("Hello wor").content == "Hello wor"
    assert parser.feed("ld <tool").content == "ld "
    assert parser.feed("_call>\n{\"name\": \"f\", ").content == ""
    final = parser.finish()
    assert final.content == '<tool_call>\n{"name": "f", '  # never closed: not a call, so it is content
    assert final.tool_calls == ()


def test_bad_call_becomes_content() -> None:
    output = "<tool_call>not json</tool_call>"
    assert parse(OutputParser(tool_format=tool_format("qwen")), [output]) == ("", output, [])


def test_tool_call_ids_are_unique() -> None:
    parser = OutputParser(tool_format=tool_format("qwen"))
    parser.feed('<tool_call>{"name": "a", "arguments": {}}</tool_call>')
    parser.feed('<tool_call>{"name": "b", "arguments": {}}</tool_call>')
    calls = parser.finish().tool_calls
    assert [c.name for c in calls] == ["a", "b"] and len({c.id for c in calls}) == 2


CALL = [FunctionCall("get_weather", json.dumps({"city": "Paris", "days": [1]}))]


@pytest.mark.parametrize("name", template_names())
def test_every_template_reads_its_own_output_in_any_pieces(name: str) -> None:
    """A reasoning answer (for reasoning templates) then a tool call in the template's own format."""
    template = SlotTemplate.named(name)
    spec = template.spec
    thought = f"{spec.thought_words[0]}some thought{spec.thought_words[1]}" if spec.reasoning else ""
    fmt = tool_format(spec.tool_format) if spec.tool_format else None
    call_text = fmt.calls_text(CALL) if fmt else ""
    if spec.tool_format == "minimax2":
        call_text = f"<minimax:tool_call>\n{call_text}\n</minimax:tool_call>"
    output = thought + call_text
    for pieces in chunkings(output, seed=len(name)):
        reasoning, content, calls = parse(template.output_parser(tools_enabled=True), pieces)
        assert reasoning == ("some thought" if spec.reasoning else "")
        if fmt is None:  # phi4_mini: tools are described as raw JSON, nothing to read back
            assert calls == []
        else:
            assert (content.strip(), calls) == ("", [(c.name, c.arguments) for c in CALL])
    plain = thought + "Just an answer, 你好."
    for pieces in chunkings(plain, seed=1):
        reasoning, content, calls = parse(template.output_parser(tools_enabled=False), pieces)
        assert content == "Just an answer, 你好." and calls == []
