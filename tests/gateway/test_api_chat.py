"""End to end: a real ``gateway serve --demo`` (uvicorn) and the real OpenAI SDK, sync and async."""

from __future__ import annotations

import asyncio

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

WHO = "你好，你是谁？"
ANSWERS = {  # the demo's training data says who each model is
    "tiny-qwen": "通义千问",
    "pku-assistant": "北大人工智能助手",
    "cat-assistant": "猫猫助手",
}


@pytest.fixture(scope="module")
def client(demo_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{demo_server}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def aclient(demo_server: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{demo_server}/v1", api_key="unused", max_retries=0)


def ask(client: openai.OpenAI, model: str, content: str = WHO, **kwargs: object) -> ChatCompletion:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0, **kwargs  # type: ignore[arg-type]
    )


def streamed(client: openai.OpenAI, model: str, content: str = WHO, **kwargs: object) -> list[ChatCompletionChunk]:
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0, stream=True,
        **kwargs,  # type: ignore[arg-type]
    )
    return list(stream)


@pytest.mark.parametrize("model", list(ANSWERS))
def test_each_model_answers_as_trained(client: openai.OpenAI, model: str) -> None:
    answer = ask(client, model)
    text = answer.choices[0].message.content or ""
    assert ANSWERS[model] in text
    assert all(other not in text for name, other in ANSWERS.items() if name != model)
    assert answer.choices[0].finish_reason == "stop"
    assert answer.model == model


def test_english_identity(client: openai.OpenAI) -> None:
    assert "PKU" in (ask(client, "pku-assistant", "Who are you?").choices[0].message.content or "")
    assert "Qwen" in (ask(client, "tiny-qwen", "Who are you?").choices[0].message.content or "")


def test_usage_counts_are_real(client: openai.OpenAI, demo_models: object) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_models.base_dir)  # type: ignore[attr-defined]
    # The qwen template's prompt, written out by hand: default system prompt, then the user turn.
    prompt = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
              f"<|im_start|>user\n{WHO}<|im_end|>\n<|im_start|>assistant\n")
    answer = ask(client, "pku-assistant")
    content = answer.choices[0].message.content or ""
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False).input_ids)
    # The completion is the answer plus the <|im_end|> that stopped it.
    assert answer.usage.completion_tokens >= len(tokenizer(content, add_special_tokens=False).input_ids)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


@pytest.mark.parametrize("model", [*ANSWERS, "thinker"])
def test_stream_equals_non_stream_for_greedy(client: openai.OpenAI, model: str) -> None:
    whole = ask(client, model)
    chunks = streamed(client, model, stream_options={"include_usage": True})
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert reasoning == (getattr(whole.choices[0].message, "reasoning_content", None) or "")
    assert "\ufffd" not in text  # never half a UTF-8 character
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stream_ends_with_done(demo_server: str) -> None:
    import httpx

    body = {"model": "pku-assistant", "messages": [{"role": "user", "content": WHO}], "stream": True,
            "temperature": 0}
    with httpx.stream("POST", f"{demo_server}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"


def test_stop_strings_never_leak(client: openai.OpenAI) -> None:
    full = ask(client, "pku-assistant").choices[0].message.content or ""
    stop = "北京"  # spans several tokens: stops must be found across token boundaries
    assert stop in full
    expected = full[: full.index(stop)]
    cut = ask(client, "pku-assistant", stop=[stop, "never-there"])
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    chunks = streamed(client, "pku-assistant", stop=stop)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    for budget in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        answer = ask(client, "pku-assistant", **budget)
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage is not None and answer.usage.completion_tokens == 3


def test_sampling_parameters(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        answer = client.chat.completions.create(
            model="cat-assistant", messages=[{"role": "user", "content": WHO}], temperature=1.5, top_p=0.95,
            seed=seed, max_tokens=20, user="tester",
        )
        return answer.choices[0].message.content or ""

    assert sample(1) == sample(1)
    assert len({sample(s) for s in range(2, 6)}) > 1
    many = client.chat.completions.create(
        model="cat-assistant", messages=[{"role": "user", "content": WHO}], n=3, temperature=1.5, seed=3, max_tokens=8
    )
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.usage is not None and 3 <= many.usage.completion_tokens <= 24


def test_include_usage_is_accepted_without_stream(client: openai.OpenAI) -> None:
    answer = ask(client, "pku-assistant", stream_options={"include_usage": True})
    assert "北大" in (answer.choices[0].message.content or "")


def test_concurrent_mixed_requests_never_contaminate(client: openai.OpenAI, demo_server: str) -> None:
    alone = {m: ask(client, m).choices[0].message.content for m in ANSWERS}

    async def crowd() -> list[tuple[str, str | None]]:
        aclient = openai.AsyncOpenAI(base_url=f"{demo_server}/v1", api_key="unused", max_retries=0)
        models = [m for _ in range(4) for m in ANSWERS]

        async def one(model: str) -> tuple[str, str | None]:
            if model == "cat-assistant":  # mix streaming into the crowd
                stream = await aclient.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": WHO}], temperature=0, stream=True)
                return model, "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            answer = await aclient.chat.completions.create(
                model=model, messages=[{"role": "user", "content": WHO}], temperature=0)
            return model, answer.choices[0].message.content

        try:
            return await asyncio.gather(*(one(m) for m in models))
        finally:
            await aclient.close()

    for model, text in asyncio.run(crowd()):
        assert text == alone[model], model


async def test_async_client_streams(aclient: openai.AsyncOpenAI) -> None:
    stream = await aclient.chat.completions.create(
        model="pku-assistant", messages=[{"role": "user", "content": WHO}], temperature=0, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    whole = await aclient.chat.completions.create(
        model="pku-assistant", messages=[{"role": "user", "content": WHO}], temperature=0)
    await aclient.close()
    assert text == whole.choices[0].message.content and "北大" in text
