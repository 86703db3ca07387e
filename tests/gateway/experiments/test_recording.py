"""What an observed response leaves in the store: figures, status, and the text only when asked to keep it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.errors import Overloaded
from gateway.experiments.recording import Observation
from gateway.experiments.routing import Resolution
from gateway.experiments.store import SQLiteFeedbackStore
from gateway.streaming import TextPiece


async def pieces(texts: list[str], fail: bool = False) -> AsyncIterator[TextPiece]:
    for text in texts[:-1]:
        yield TextPiece(text)
    if fail:
        raise Overloaded("queue full")
    yield TextPiece(texts[-1], "stop", completion_tokens=len(texts))


def observation(store: SQLiteFeedbackStore, keep_text: bool) -> Observation:
    return Observation(store, "chatcmpl-1", "chat", Resolution("bot", "pku-assistant", route="bot", blind=True),
                       prompt="<|im_start|>user\nhi", prompt_tokens=5, sampling={"temperature": 0.0},
                       keep_text=keep_text)


@pytest.mark.parametrize("keep_text", [False, True])
async def test_a_finished_response_is_recorded_before_its_last_piece_is_passed_on(keep_text: bool) -> None:
    store = await SQLiteFeedbackStore.open(":memory:")
    watched = observation(store, keep_text)
    (stream,) = watched.watch([pieces(["我是", "北大", "助手"])])
    texts = []
    async for piece in stream:
        if piece.finish_reason is not None:  # the client sees the end only once the record exists
            assert "chatcmpl-1" in await store.find(["chatcmpl-1"])
        texts.append(piece.text)
    record = (await store.find(["chatcmpl-1"]))["chatcmpl-1"]
    where = (record.model, record.route, record.variant, record.status)
    assert where == ("pku-assistant", "bot", "pku-assistant", "ok")
    assert (record.prompt_tokens, record.completion_tokens, record.sampling) == (5, 3, {"temperature": 0.0})
    assert record.ttft_s is not None and 0 < record.ttft_s <= record.latency_s
    assert len(record.prompt_hash) == 64
    assert (record.prompt, record.output) == (("<|im_start|>user\nhi", "我是北大助手") if keep_text else (None, None))
    assert watched.tokens_per_s == pytest.approx(3 / record.latency_s)


async def test_a_failed_and_a_cancelled_response_are_recorded_as_such() -> None:
    store = await SQLiteFeedbackStore.open(":memory:")
    failed = observation(store, False)
    (stream,) = failed.watch([pieces(["a", "b"], fail=True)])
    with pytest.raises(Overloaded):
        async for _ in stream:
            pass
    assert (await store.find(["chatcmpl-1"]))["chatcmpl-1"].status == "error"
    cancelled = Observation(store, "chatcmpl-2", "chat", Resolution("tiny-qwen", "tiny-qwen"), prompt="p",
                            prompt_tokens=1, sampling={}, keep_text=False)
    (stream,) = cancelled.watch([pieces(["a", "b", "c"])])
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]  # the client went away
    record = (await store.find(["chatcmpl-2"]))["chatcmpl-2"]
    assert (record.status, record.route, record.variant) == ("cancelled", None, None)


async def test_n_choices_make_one_record() -> None:
    store = await SQLiteFeedbackStore.open(":memory:")
    watched = observation(store, True)
    streams = watched.watch([pieces(["x", "y"]), pieces(["z"])])
    for stream in streams:
        async for _ in stream:
            pass
    record = (await store.find(["chatcmpl-1"]))["chatcmpl-1"]
    assert record.completion_tokens == 3 and record.output == "xy\x1ez"
