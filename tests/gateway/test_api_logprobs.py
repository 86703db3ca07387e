"""Logprobs end to end: a real ``gateway serve --demo``, the real OpenAI SDK types, and the numbers checked against the
demo model run directly through transformers + peft (float32)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch

WHO = "你好，你是谁？"
TOL = 1e-4


@pytest.fixture(scope="module")
def client(demo_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{demo_server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(demo_models: Any) -> Iterator[Any]:
    """The demo base and its pku-assistant adapter as plain transformers/peft models (the numbers' oracle)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_models.base_dir)
    base = AutoModelForCausalLM.from_pretrained(demo_models.base_dir, dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(demo_models.base_dir, dtype=torch.float32),
        str(demo_models.adapters["pku-assistant"]),
    ).eval()
    yield {"tokenizer": tokenizer, None: base, "pku-assistant": adapted}


def log_softmax_rows(model: Any, ids: list[int]) -> torch.Tensor:
    """Log-softmax of the next-token distribution after every prefix of ``ids`` ([len(ids), vocab])."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def rendered_ids(demo_server: str, model: str, content: str) -> list[int]:
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    return list(httpx.post(f"{demo_server}/v1/chat/render", json=body, timeout=30).json()["token_ids"])


def test_chat_logprobs_are_the_models_log_softmax(client: openai.OpenAI, demo_server: str, reference: Any) -> None:
    tokenizer = reference["tokenizer"]
    answer = client.chat.completions.create(
        model="pku-assistant", messages=[{"role": "user", "content": WHO}], temperature=0, max_tokens=40,
        logprobs=True, top_logprobs=3,
    )
    choice = answer.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    content = choice.logprobs.content
    # Greedy: walk the model ourselves along the same tokens.
    prompt = rendered_ids(demo_server, "pku-assistant", WHO)
    ids = list(prompt)
    generated = []
    for _ in content:
        next_id = int(torch.argmax(log_softmax_rows(reference["pku-assistant"], ids)[-1]))
        generated.append(next_id)
        ids.append(next_id)
    rows = log_softmax_rows(reference["pku-assistant"], ids)[len(prompt) - 1 :]
    for position, (entry, token_id) in enumerate(zip(content, generated, strict=True)):
        assert entry.token == tokenizer.decode([token_id], skip_special_tokens=False)
        assert abs(entry.logprob - float(rows[position, token_id])) < TOL
        top = torch.topk(rows[position], 3)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([int(i)]) for i in top.indices]
        for t, value in zip(entry.top_logprobs, top.values.tolist(), strict=True):
            assert abs(t.logprob - value) < TOL
        assert entry.top_logprobs[0].logprob >= entry.logprob - TOL  # greedy: the chosen token is the top one
    # The answer's text is the tokens' text; the stop token that ended it is reported last, without text.
    text = choice.message.content or ""
    assert choice.finish_reason == "stop"
    assert bytes(b for e in content[:-1] for b in e.bytes or []).decode("utf-8") == text
    assert content[-1].token == "<|im_end|>"


def test_streamed_logprobs_equal_the_whole_answer(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": "cat-assistant", "messages": [{"role": "user", "content": WHO}],
                              "temperature": 0, "max_tokens": 30, "logprobs": True, "top_logprobs": 2}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert whole.choices[0].logprobs is not None
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [
        (e.token, round(e.logprob, 5)) for e in whole.choices[0].logprobs.content or []]
    assert all(len(e.top_logprobs) == 2 for e in streamed)


def test_no_logprobs_unless_asked(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="tiny-qwen", messages=[{"role": "user", "content": WHO}],
                                            temperature=0, max_tokens=5)
    assert answer.choices[0].logprobs is None


def test_a_stop_string_trims_the_logprobs_with_the_text(client: openai.OpenAI) -> None:
    free = client.chat.completions.create(model="pku-assistant", messages=[{"role": "user", "content": WHO}],
                                          temperature=0, max_tokens=40, logprobs=True)
    text = free.choices[0].message.content or ""
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.chat.completions.create(model="pku-assistant", messages=[{"role": "user", "content": WHO}],
                                         temperature=0, max_tokens=40, logprobs=True, stop=[stop])
    short = cut.choices[0].message.content or ""
    assert short == text[: text.index(stop)]
    assert cut.choices[0].logprobs is not None
    tokens = [e.token for e in cut.choices[0].logprobs.content or []]
    joined = "".join(tokens)
    # Every reported token contributed to the returned text; together they cover it.
    assert joined.startswith(short) and len("".join(tokens[:-1])) < len(short)


def test_completion_echo_logprobs_with_token_prompt(client: openai.OpenAI, demo_server: str, reference: Any) -> None:
    tokenizer = reference["tokenizer"]
    prompt = tokenizer("The quick brown fox jumps", add_special_tokens=False).input_ids
    answer = client.completions.create(model="tiny-qwen", prompt=prompt, max_tokens=3, temperature=0, logprobs=2,
                                       echo=True)
    choice = answer.choices[0]
    assert choice.logprobs is not None
    lp = choice.logprobs
    assert lp.token_logprobs is not None and lp.tokens is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == len(prompt) + answer.usage.completion_tokens  # type: ignore[union-attr]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert choice.text.startswith(tokenizer.decode(prompt))
    ids = list(prompt)
    for _ in range(len(lp.tokens) - len(prompt)):
        ids.append(int(torch.argmax(log_softmax_rows(reference[None], ids)[-1])))
    rows = log_softmax_rows(reference[None], ids)
    for position in range(1, len(ids)):
        assert lp.tokens[position] == tokenizer.decode([ids[position]])
        assert abs(lp.token_logprobs[position] - float(rows[position - 1, ids[position]])) < TOL  # type: ignore[operator]
        top = torch.topk(rows[position - 1], 2)
        values = list(lp.top_logprobs[position].values())  # type: ignore[union-attr]
        # Keys are token strings: two tokens that are halves of UTF-8 characters both read U+FFFD and share one.
        assert abs(values[0] - float(top.values[0])) < TOL
        assert all(min(abs(v - t) for t in top.values.tolist()) < TOL for v in values)
    assert lp.text_offset == sorted(lp.text_offset)


def test_several_token_prompts_in_one_request(client: openai.OpenAI, reference: Any) -> None:
    tokenizer = reference["tokenizer"]
    prompts = [tokenizer("Hello there", add_special_tokens=False).input_ids,
               tokenizer("你好", add_special_tokens=False).input_ids]
    batch = client.completions.create(model="tiny-qwen", prompt=prompts, max_tokens=4, temperature=0, logprobs=0)
    alone = [client.completions.create(model="tiny-qwen", prompt=p, max_tokens=4, temperature=0).choices[0].text
             for p in prompts]
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == alone
    for choice in batch.choices:
        assert choice.logprobs is not None and choice.logprobs.top_logprobs is not None
        assert all(top == {} for top in choice.logprobs.top_logprobs)
        assert all(v is not None and v <= 0 and math.isfinite(v) for v in choice.logprobs.token_logprobs or [])


@pytest.mark.parametrize("body, param", [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logit_bias": {"999999": 5}}, "logit_bias"),
    ({"logit_bias": {"abc": 5}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
])
def test_bad_knobs_are_refused_by_name(demo_server: str, body: dict[str, Any], param: str) -> None:
    request = {"model": "tiny-qwen", "messages": [{"role": "user", "content": WHO}], "max_tokens": 2, **body}
    response = httpx.post(f"{demo_server}/v1/chat/completions", json=request, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert param in (error.get("param") or "") + error["message"]


def test_completion_logprobs_bound(demo_server: str) -> None:
    request = {"model": "tiny-qwen", "prompt": "Hi", "max_tokens": 2, "logprobs": 21}
    response = httpx.post(f"{demo_server}/v1/completions", json=request, timeout=30)
    assert response.status_code == 400


def test_logit_bias_bans_and_forces_tokens(client: openai.OpenAI, reference: Any) -> None:
    tokenizer = reference["tokenizer"]
    free = client.chat.completions.create(model="pku-assistant", messages=[{"role": "user", "content": WHO}],
                                          temperature=0, max_tokens=8, logprobs=True)
    first = (free.choices[0].logprobs.content or [])[0].token  # type: ignore[union-attr]
    first_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(first))[0]
    banned = client.chat.completions.create(model="pku-assistant", messages=[{"role": "user", "content": WHO}],
                                            temperature=0, max_tokens=8, logprobs=True,
                                            logit_bias={str(first_id): -100})
    assert (banned.choices[0].logprobs.content or [])[0].token != first  # type: ignore[union-attr]
    forced_id = tokenizer("猫", add_special_tokens=False).input_ids[0]
    forced = client.chat.completions.create(model="pku-assistant", messages=[{"role": "user", "content": WHO}],
                                            temperature=0.8, seed=1, max_tokens=3,
                                            logit_bias={str(forced_id): 100})
    assert forced.choices[0].message.content == tokenizer.decode([forced_id]) * 3
