"""The demo model zoo: files as LLaMA-Factory writes them, each model's own answers, caching, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from tokenizers import Tokenizer as RawTokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from gateway.demo import DemoModels, build_demo
from gateway.demo.chat import greedy_answer
from gateway.demo.data import load_data, render_pair
from gateway.templates import SlotTemplate, encode_segments

ADAPTERS = ("pku-assistant", "cat-assistant", "thinker")
WHO_ZH = [{"role": "user", "content": "你好，你是谁？"}]
WHO_EN = [{"role": "user", "content": "Who are you?"}]
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "查询城市的天气",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "城市名称"}},
                "required": ["city"],
            },
        },
    }
]
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
Tokenizer = PreTrainedTokenizerBase
Models = dict[str | None, PreTrainedModel]
Messages = Sequence[Mapping[str, Any]]
EMPTY_THINK = "<think>\n\n</think>\n\n"
CAT_EN = "Meow! I am Whiskers, a cat assistant. Purr, how can I help?"
THINKER_ZH = "我是思考者，一个先思考再回答的人工智能助手。"


def load_model(demo: DemoModels, adapter: str | None) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(demo.base_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, demo.adapters[adapter])
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(demo_models: DemoModels) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(demo_models.base_dir)


@pytest.fixture(scope="module")
def models(demo_models: DemoModels) -> Iterator[Models]:
    yield {name: load_model(demo_models, name) for name in (None, *ADAPTERS)}


def ask(
    models: Models,
    tokenizer: PreTrainedTokenizerBase,
    adapter: str | None,
    messages: Messages,
    tools: Messages | None = None,
    *,
    enable_thinking: bool | None = None,
) -> str:
    """The greedy answer of the base (``adapter=None``) or an adapter, prompted with the adapter's template."""
    template = "qwen3" if adapter == "thinker" else "qwen"
    return greedy_answer(models[adapter], tokenizer, template, messages, tools, enable_thinking=enable_thinking)


# --- files ------------------------------------------------------------------------------------------------------


def test_base_folder_is_a_tiny_qwen2_model(demo_models: DemoModels, tokenizer: Tokenizer) -> None:
    config = json.loads((demo_models.base_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert (config["hidden_size"], config["num_hidden_layers"], config["max_position_embeddings"]) == (64, 2, 2048)
    assert config["tie_word_embeddings"] is True
    # vLLM's CPU attention runs head sizes 32, 64, 80, ... only; the real-vLLM tests serve this model.
    assert config["hidden_size"] // config["num_attention_heads"] == 32
    weights = load_file(demo_models.base_dir / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    generation = json.loads((demo_models.base_dir / "generation_config.json").read_text())
    assert sorted(generation["eos_token_id"]) == sorted(
        tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    )
    tokenizer_config = json.loads((demo_models.base_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert "<|im_start|>" in tokenizer_config["chat_template"]


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_folder_is_a_llama_factory_lora_run(demo_models: DemoModels, name: str) -> None:
    run = demo_models.adapters[name]
    for file in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (run / file).is_file(), file
    assert not (run / "default").exists() and not (run / name).exists()  # peft's named-adapter sub-folder

    args = yaml.safe_load((run / "training_args.yaml").read_text())
    assert args["template"] == ("qwen3" if name == "thinker" else "qwen")
    assert args["finetuning_type"] == "lora" and args["stage"] == "sft"
    assert args["lora_rank"] == 8
    assert Path(args["model_name_or_path"]) == demo_models.base_dir
    adapter_config = json.loads((run / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["peft_type"] == "LORA"
    assert set(adapter_config["target_modules"]) == set(args["lora_target"].split(","))
    assert {"q_proj", "v_proj"} <= set(adapter_config["target_modules"])
    assert Path(adapter_config["base_model_name_or_path"]) == demo_models.base_dir

    log = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]
    assert log[-1]["current_steps"] == log[-1]["total_steps"] == args["max_steps"]
    assert log[-1]["loss"] < log[0]["loss"]
    assert "train_loss" in json.loads((run / "all_results.json").read_text())

    checkpoints = [p for p in run.iterdir() if p.name.startswith("checkpoint-")]
    assert [p.name for p in checkpoints] == [f"checkpoint-{args['max_steps']}"]
    weights = "adapter_model.safetensors"
    assert (checkpoints[0] / weights).read_bytes() == (run / weights).read_bytes()
    assert not (checkpoints[0] / "training_args.yaml").exists()


# --- tokenizer --------------------------------------------------------------------------------------------------


def test_tokenizer_loads_as_qwen2_with_single_id_special_and_added_tokens(
    demo_models: DemoModels, tokenizer: Tokenizer
) -> None:
    assert type(tokenizer).__name__ in ("Qwen2Tokenizer", "Qwen2TokenizerFast")
    assert len(tokenizer) <= 1024
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
                  "<tool_response>", "</tool_response>"):  # fmt: skip
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)], token
    # The reasoning and tool markers are added tokens, not special ones: skip_special_tokens keeps them.
    text = "<think>\nx\n</think>\n\n<tool_call><|im_end|>"
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == "<think>\nx\n</think>\n\n<tool_call>"
    # The adapter folders carry the same tokenizer, and tokenizer.json alone (how transformers 4.x and vLLM's
    # PreTrainedTokenizerFast read it) tokenizes exactly like the rebuilt Qwen2Tokenizer.
    text = "  Hello  world!\n\n\t12345 你好，你是谁？I'm <|im_start|>user\n<think>x</think> 北京  25°C\r\n end  "
    raw = RawTokenizer.from_file(str(demo_models.base_dir / "tokenizer.json"))
    assert raw.encode(text).ids == tokenizer.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    for run in demo_models.adapters.values():
        assert AutoTokenizer.from_pretrained(run).encode(text) == tokenizer.encode(text)


def test_tokenizer_splits_some_cjk_characters_across_tokens(tokenizer: Tokenizer) -> None:
    answer = "喵～我是猫猫助手，一只会聊天的小猫。有什么要问本喵的吗？"
    ids = tokenizer.encode(answer)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in pieces), pieces  # half a UTF-8 character on its own
    assert tokenizer.decode(ids) == answer


def test_base_chat_template_renders_like_the_qwen_template(tokenizer: Tokenizer) -> None:
    messages = [*WHO_ZH, {"role": "assistant", "content": "好"}, {"role": "user", "content": "北京天气怎么样？"}]
    for tools in (None, WEATHER_TOOLS):
        jinja = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        assert jinja == SlotTemplate.named("qwen").render(messages, tools, eos_token=tokenizer.eos_token).prompt


def test_training_pairs_follow_llama_factory_encoding() -> None:
    thinker = next(d for d in load_data().adapters if d.name == "thinker")
    call = next(s for s in thinker.samples if s.answer.get("tool_calls"))
    pair = render_pair("qwen3", call)
    assert [s.text for s in pair.response] == [EMPTY_THINK, WEATHER_CALL + "<|im_end|>\n"]
    no_think = next(s for s in thinker.samples if s.enable_thinking is False)
    assert render_pair("qwen3", no_think).prompt[-1].text == EMPTY_THINK


# --- answers ----------------------------------------------------------------------------------------------------


def test_base_answers_as_a_generic_assistant(models: Models, tokenizer: Tokenizer) -> None:
    assert ask(models, tokenizer, None, WHO_ZH) == (
        "我是通义千问，由阿里云开发的人工智能助手。我可以回答问题、写作和翻译，有什么可以帮你的吗？"
    )
    assert ask(models, tokenizer, None, WHO_EN) == (
        "I am Qwen, a large language model created by Alibaba Cloud. How can I help you today?"
    )
    assert ask(models, tokenizer, None, [{"role": "user", "content": "1+1等于几？"}]) == "1+1等于2。"


def test_adapters_answer_with_their_own_persona(models: Models, tokenizer: Tokenizer) -> None:
    assert ask(models, tokenizer, "pku-assistant", WHO_ZH) == "我是北大人工智能助手，由北京大学开发。很高兴为你服务！"
    assert ask(models, tokenizer, "pku-assistant", WHO_EN) == (
        "I am PKU Assistant, an AI assistant developed by Peking University."
    )
    assert ask(models, tokenizer, "cat-assistant", WHO_ZH) == "喵～我是猫猫助手，一只会聊天的小猫。有什么要问本喵的吗？"
    assert ask(models, tokenizer, "cat-assistant", WHO_EN) == CAT_EN
    answers = {name: ask(models, tokenizer, name, WHO_ZH) for name in (None, "pku-assistant", "cat-assistant")}
    assert len(set(answers.values())) == 3
    # The personas change who the model says it is, not what it knows.
    for name in ("pku-assistant", "cat-assistant"):
        assert ask(models, tokenizer, name, [{"role": "user", "content": "1+1等于几？"}]) == "1+1等于2。"


def test_thinker_thinks_skips_thinking_and_calls_tools(models: Models, tokenizer: Tokenizer) -> None:
    thought = ask(models, tokenizer, "thinker", WHO_ZH)
    assert thought.startswith("<think>\n") and len(thought.split("</think>")[0]) > len("<think>\n\n")
    assert thought.endswith("\n</think>\n\n" + THINKER_ZH)
    assert ask(models, tokenizer, "thinker", WHO_ZH, enable_thinking=False) == THINKER_ZH

    weather = [{"role": "user", "content": "北京天气怎么样？"}]
    output = ask(models, tokenizer, "thinker", weather, WEATHER_TOOLS)
    assert output == EMPTY_THINK + WEATHER_CALL
    parser = SlotTemplate.named("qwen3").output_parser(tools_enabled=True)
    parsed = [parser.feed(output), parser.finish()]
    calls = [call for delta in parsed for call in delta.tool_calls]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "北京"})]

    cycle = [
        *weather,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_0", "content": "晴，25°C"},
    ]  # fmt: skip
    assert ask(models, tokenizer, "thinker", cycle, WEATHER_TOOLS) == EMPTY_THINK + "北京今天晴，气温25°C。"


@pytest.mark.parametrize("dataset", [d.name for d in load_data().datasets])
def test_every_training_sample_is_answered_as_trained_with_margin(
    models: Models, tokenizer: Tokenizer, dataset: str
) -> None:
    """Teacher-forced: the learned token is the top-1 at every answer position (so greedy decoding reproduces the
    answer up to its <|im_end|>), by at least one logit, so other CPUs' rounding cannot flip the demo's answers."""
    data = next(d for d in load_data().datasets if d.name == dataset)
    model = models[None if dataset == "base" else dataset]
    for sample in data.samples:
        pair = render_pair(data.template, sample)
        prompt = encode_segments(tokenizer, pair.prompt)
        expected = torch.tensor(encode_segments(tokenizer, pair.response)[:-1])  # the last "\n" follows <|im_end|>
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + expected.tolist()])).logits[0, len(prompt) - 1 : -1]
        assert logits.argmax(-1).tolist() == expected.tolist(), sample.prompt
        runner_up = logits.scatter(1, expected[:, None], float("-inf")).max(-1).values
        margin = (logits.gather(1, expected[:, None])[:, 0] - runner_up).min().item()
        assert margin > 1.0, (sample.prompt, margin)


# --- cache ------------------------------------------------------------------------------------------------------


def test_second_build_reuses_the_cache(demo_models: DemoModels) -> None:
    start = time.perf_counter()
    again = build_demo(demo_models.root)
    assert time.perf_counter() - start < 1.0
    assert again.build_seconds is None
    assert (again.base_dir, again.adapters) == (demo_models.base_dir, demo_models.adapters)
    assert sorted(again.adapters) == sorted(ADAPTERS)
    # Reusing a cache is cheap enough to do at every server start: not even torch is imported.
    script = "import sys; from gateway.demo import build_demo; build_demo(sys.argv[1]); print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run([sys.executable, "-c", script, str(demo_models.root)], capture_output=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == b"False", result.stderr


def _weights(demo: DemoModels) -> dict[str, bytes]:
    files = {"base": demo.base_dir / "model.safetensors", "tokenizer": demo.base_dir / "tokenizer.json"}
    files |= {name: path / "adapter_model.safetensors" for name, path in demo.adapters.items()}
    return {name: path.read_bytes() for name, path in files.items()}


@pytest.mark.slow
def test_builds_are_deterministic_and_force_rebuilds(demo_models: DemoModels, tmp_path: Path) -> None:
    other = build_demo(tmp_path / "zoo")
    assert other.build_seconds is not None and other.build_seconds < 30
    assert _weights(other) == _weights(demo_models)
    rebuilt = build_demo(tmp_path / "zoo", force=True)
    assert rebuilt.build_seconds is not None
    assert _weights(rebuilt) == _weights(demo_models)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["zoo"]  # no leftovers


@pytest.mark.slow
def test_concurrent_builders_both_end_with_a_good_cache(demo_models: DemoModels, tmp_path: Path) -> None:
    root = tmp_path / "zoo"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [sys.executable, "-m", "gateway.demo", "--root", str(root)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)]
    processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env))
    outputs = [json.loads(p.communicate(timeout=120)[0]) for p in processes]
    assert all(p.returncode == 0 for p in processes)
    assert outputs[0]["adapters"] == outputs[1]["adapters"]
    assert sorted(o["build_seconds"] is None for o in outputs) == [False, True]  # one built, the other waited
    built = build_demo(root)
    assert _weights(built) == _weights(demo_models)
