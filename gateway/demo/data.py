"""The demo's training data (``data.yaml``) and its encoding into LLaMA-Factory training pairs.

Every prompt is rendered by ``gateway.templates`` — the code path the server uses — so what the demo models learn is
exactly what the gateway will send them. The answer is the template's assistant (or function) formatter applied to
the last message, each element tokenized on its own with ``add_special_tokens=False``, as LLaMA-Factory does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, cast

import yaml
from transformers import PreTrainedTokenizerBase

from gateway.templates import Segment, TemplateSpec, encode_segments, load_spec, render, to_conversation
from gateway.templates.conversation import Turn
from gateway.templates.rendering import Tokenizer, empty_thought, remove_thought, render_response

# The tokenizer's eos; the qwen templates replace it by <|im_end|> (replace_eos), as LLaMA-Factory does in training.
TOKENIZER_EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Sample:
    """One conversation: ``prompt`` messages (OpenAI style) and the assistant ``answer`` message to learn."""

    prompt: tuple[Mapping[str, Any], ...]
    answer: Mapping[str, Any]
    tools: tuple[Mapping[str, Any], ...] | None
    enable_thinking: bool | None


@dataclass(frozen=True)
class Recipe:
    """How one model is trained; the LoRA fields are unused for the full fine-tune."""

    steps: int
    learning_rate: float
    seed: int
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_target: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass(frozen=True)
class Dataset:
    name: str
    template: str
    recipe: Recipe
    samples: tuple[Sample, ...]


@dataclass(frozen=True)
class DemoData:
    base: Dataset
    adapters: tuple[Dataset, ...]

    @property
    def datasets(self) -> tuple[Dataset, ...]:
        return (self.base, *self.adapters)


@dataclass(frozen=True)
class Pair:
    """A training pair as segments; ``prompt`` is masked from the loss, ``response`` is learned."""

    prompt: tuple[Segment, ...]
    response: tuple[Segment, ...]

    @property
    def text(self) -> str:
        return "".join(segment.text for segment in (*self.prompt, *self.response))


@dataclass(frozen=True)
class EncodedPair:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]


def _dataset(name: str, raw: Mapping[str, Any]) -> Dataset:
    samples = []
    for item in raw["samples"]:
        messages = item["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(f"demo data {name}: every sample must end with the assistant answer")
        samples.append(
            Sample(
                prompt=tuple(messages[:-1]),
                answer=messages[-1],
                tools=tuple(item["tools"]) if item.get("tools") else None,
                enable_thinking=item.get("enable_thinking"),
            )
        )
    training = dict(raw["training"])
    if "lora_target" in training:
        training["lora_target"] = tuple(training["lora_target"].split(","))
    return Dataset(name=name, template=raw["template"], recipe=Recipe(**training), samples=tuple(samples))


def load_data() -> DemoData:
    """Read ``data.yaml`` from the package."""
    raw = yaml.safe_load(resources.files("gateway.demo").joinpath("data.yaml").read_text(encoding="utf-8"))
    return DemoData(
        base=_dataset("base", raw["base"]),
        adapters=tuple(_dataset(name, spec) for name, spec in raw["adapters"].items()),
    )


def answer_turn(message: Mapping[str, Any]) -> Turn:
    """An assistant message as the turn LLaMA-Factory trains on: tool calls become a function turn whose content is
    the JSON list of ``{"name", "arguments"}`` with the arguments as an object."""
    tool_calls: Sequence[Mapping[str, Any]] = message.get("tool_calls") or ()
    if not tool_calls:
        return Turn("assistant", message.get("content") or "")
    calls = []
    for call in tool_calls:
        arguments = call["function"]["arguments"]
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        calls.append({"name": call["function"]["name"], "arguments": arguments})
    return Turn("function", json.dumps(calls, ensure_ascii=False))


def _has_thought(spec: TemplateSpec, content: str) -> bool:
    return any(word.strip() in content for word in spec.thought_words)


def render_pair(template: str, sample: Sample) -> Pair:
    """The prompt (rendered as the server renders it) and the answer's elements.

    For a reasoning template this follows LLaMA-Factory's single-turn encoding: with thinking on, an answer without a
    thought gets the empty think block in front (learned); with thinking off the thought is removed from the answer
    and the empty block ends the prompt (``render`` puts it there).
    """
    spec = load_spec(template)
    thinking = spec.enable_thinking if sample.enable_thinking is None else sample.enable_thinking
    conversation = to_conversation(sample.prompt, sample.tools)
    prompt = render(spec, conversation, enable_thinking=thinking, eos_token=TOKENIZER_EOS)
    turn = answer_turn(sample.answer)
    if spec.reasoning and not thinking:
        turn = replace(turn, content=remove_thought(spec, turn.content))
    response = render_response(spec, turn, eos_token=TOKENIZER_EOS)
    if spec.reasoning and thinking and not _has_thought(spec, turn.content):
        response = (Segment("text", empty_thought(spec)), *response)
    return Pair(prompt=prompt.segments, response=response)


def as_segment_tokenizer(tokenizer: PreTrainedTokenizerBase) -> Tokenizer:
    """A Hugging Face tokenizer as ``encode_segments`` expects it (its overloads are wider than that protocol)."""
    return cast(Tokenizer, tokenizer)


def encode_pair(tokenizer: PreTrainedTokenizerBase, pair: Pair) -> EncodedPair:
    """Token ids of a pair, element by element, as LLaMA-Factory tokenizes training data."""
    segment_tokenizer = as_segment_tokenizer(tokenizer)
    prompt = encode_segments(segment_tokenizer, pair.prompt)
    return EncodedPair(tuple(prompt), tuple(encode_segments(segment_tokenizer, pair.response)))


def corpus(data: DemoData) -> list[str]:
    """The text the demo tokenizer is trained on: every rendered training conversation."""
    return [render_pair(dataset.template, sample).text for dataset in data.datasets for sample in dataset.samples]
