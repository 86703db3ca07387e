"""ServedTokenizer: the same ids as the transformers tokenizer it wraps, by the faster route."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from gateway.tokenization import ServedTokenizer

TEXTS = [
    "",
    "你好，世界！Hello, world.",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你是谁？<|im_end|>\n",
    "<think>\n\n</think>\n\n",
    "emoji 🙂🙃 and combining e\u0301 and \u00a0nbsp\t tabs   spaces\r\n",
    "<|endoftext|><|endoftext|>",
]


EXTRA = Path(__file__).parent / "data" / "lf_templates_extra.json"  # LLaMA-Factory renderings: many templates


def rendered_texts() -> list[str]:
    out: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(EXTRA.read_text(encoding="utf-8")))
    return out


@pytest.fixture(scope="module")
def tokenizers(demo_models):  # type: ignore[no-untyped-def]
    hf = AutoTokenizer.from_pretrained(demo_models.base_dir)
    return hf, ServedTokenizer(hf)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_equals_transformers_on_every_rendered_string(tokenizers, add_special_tokens: bool) -> None:
    hf, served = tokenizers
    texts = TEXTS + sorted(set(rendered_texts()))
    assert len(texts) > 1000
    for text in texts:
        assert served.encode(text, add_special_tokens=add_special_tokens) == hf.encode(
            text, add_special_tokens=add_special_tokens
        ), text


def test_everything_else_is_the_wrapped_tokenizer(tokenizers) -> None:
    hf, served = tokenizers
    assert served.eos_token == hf.eos_token and served.pad_token_id == hf.pad_token_id
    ids = hf.encode(TEXTS[2])
    assert served.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert served.convert_tokens_to_ids("<|im_end|>") == hf.convert_tokens_to_ids("<|im_end|>")


def test_a_slow_tokenizer_keeps_its_own_encode() -> None:
    class Slow:
        is_fast = False

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [len(text), int(add_special_tokens)]

    assert ServedTokenizer(Slow()).encode("abc", add_special_tokens=False) == [3, 0]
