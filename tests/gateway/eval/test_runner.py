"""What an answer becomes in generated_predictions.jsonl, and where a model's files go."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.eval.results import model_dir
from gateway.eval.runner import Sampling, predicted_text


def test_text_answers_are_the_content() -> None:
    assert predicted_text({"role": "assistant", "content": "我是北大人工智能助手"}) == "我是北大人工智能助手"
    assert predicted_text({"role": "assistant", "content": None}) == ""


def test_tool_calls_become_llama_factorys_function_turn() -> None:
    message = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}},
        {"id": "call_1", "type": "function", "function": {"name": "broken", "arguments": "{not json"}},
    ]}
    assert json.loads(predicted_text(message)) == [{"name": "get_weather", "arguments": {"city": "北京"}},
                                                   {"name": "broken", "arguments": "{not json"}]
    assert "北京" in predicted_text(message)  # ensure_ascii=False, as LLaMA-Factory's data


def test_sampling_sends_only_what_is_set() -> None:
    assert Sampling().fields() == {"temperature": 0.0, "max_tokens": 1024}
    assert Sampling(temperature=0.95, top_p=0.7, top_k=50, max_tokens=64, seed=1).fields() == {
        "temperature": 0.95, "top_p": 0.7, "top_k": 50, "max_tokens": 64, "seed": 1}


def test_model_folders_stay_inside_the_output() -> None:
    out = Path("/out")
    assert model_dir(out, "pku-assistant") == out / "pku-assistant"
    assert model_dir(out, "train_2025/checkpoint-200") == out / "train_2025_checkpoint-200"
    assert model_dir(out, "../etc") == out / "_etc"
