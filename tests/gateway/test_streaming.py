"""Incremental detokenization and stop strings, with the demo's real byte-level tokenizer."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from gateway.streaming import IncrementalDetokenizer, StopMatcher

TEXTS = [
    "我是北大人工智能助手，由北京大学开发。",
    "Meow! I am Whiskers 🐱, a café cat.",
    "喵～\n\n  spaces  and\ttabs ✓",
]


@pytest.fixture(scope="module")
def tokenizer(demo_models: object) -> object:
    return AutoTokenizer.from_pretrained(demo_models.base_dir)  # type: ignore[attr-defined]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_the_full_decode_and_are_whole_characters(tokenizer: object, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
    assert len(ids) > len(text) / 3  # byte-level BPE with a tiny vocab: characters do get split
    detokenizer = IncrementalDetokenizer(tokenizer)  # type: ignore[arg-type]
    pieces = [detokenizer.add([i]) for i in ids] + [detokenizer.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_split_character_waits_for_its_last_byte(tokenizer: object) -> None:
    ids = tokenizer.encode("龘", add_special_tokens=False)  # type: ignore[attr-defined]
    assert len(ids) == 3  # not in the demo's training text: one token per UTF-8 byte
    detokenizer = IncrementalDetokenizer(tokenizer)  # type: ignore[arg-type]
    assert [detokenizer.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detokenizer.add([ids[-1]]) == "龘"


@pytest.mark.parametrize("seed", range(5))
def test_stop_string_found_across_any_chunking(seed: int) -> None:
    text = "我是北大人工智能助手，由北京大学开发。"
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), 6))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    matcher = StopMatcher(["北京大学", "never"])
    out = "".join(matcher.feed(c) for c in chunks) + matcher.flush()
    assert out == "我是北大人工智能助手，由"
    assert matcher.stopped


def test_text_without_stop_passes_through_whole() -> None:
    matcher = StopMatcher(["<|im_end|>"])
    out = "".join(matcher.feed(c) for c in ["a<|", "im", "_e", "x"]) + matcher.flush()
    assert out == "a<|im_ex" and not matcher.stopped


CLEANUP_TEXTS = ["Is it ChatGPT ? Yes , it is . I 've seen it , don 't worry !", "a  ' s . .. ?? x n't", " ?"]


@pytest.mark.parametrize("text", CLEANUP_TEXTS)
@pytest.mark.parametrize("cleans", [True, False])
async def test_streamed_text_is_one_decode_of_all_ids_cleaned_per_the_tokenizer(tokenizer: object, text: str,
                                                                                 cleans: bool) -> None:
    from backends.base import Delta
    from gateway.streaming import stream_text

    ids = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]

    async def deltas():  # type: ignore[no-untyped-def]
        for i in ids:
            yield Delta(token_ids=(i,))
        yield Delta(finish_reason="stop")

    pieces = [piece.text async for piece in stream_text(deltas(), tokenizer, (), clean_up=cleans)]  # type: ignore
    expected = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # type: ignore
    if cleans:
        expected = tokenizer.clean_up_tokenization(expected)  # type: ignore[attr-defined]
    assert "".join(pieces) == expected
    if cleans and "ChatGPT ?" in text:
        assert "ChatGPT?" in expected and "I've" in expected
