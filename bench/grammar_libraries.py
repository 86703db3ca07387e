"""xgrammar vs llguidance on our tokenizers: compile time per schema, per-token mask time, and validity.

Why this exists: ``backends/structured.py`` had to pick one library; this is the measurement behind the choice
(the numbers are in that module's docstring). Both libraries must be installed to run it; only the chosen one is a
dependency of the project::

    pip install xgrammar llguidance torch==2.13.0
    python -m bench.grammar_libraries --tokenizer DIR [--tokenizer DIR ...] [--samples 20]

Each sample is decoded by a "model" that picks uniformly among the tokens the grammar allows (an untrained model
at temperature 1 is no better): the output must parse and validate against the schema every time it completes.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from typing import Any

import jsonschema
import torch
from transformers import PreTrainedTokenizerFast

SCHEMAS: dict[str, dict[str, Any]] = {
    "weather_args": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                     "additionalProperties": False},
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"type": "string", "format": "email"},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
            "admin": {"type": "boolean"},
        },
        "required": ["name", "age", "tags", "admin"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "maxLength": 8}, "qty": {"type": "integer", "minimum": 1},
                               "price": {"type": "number"}},
                "required": ["sku", "qty"], "additionalProperties": False}},
            "status": {"enum": ["new", "paid", "shipped"]},
            "note": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
        },
        "required": ["id", "items", "status"],
        "additionalProperties": False,
    },
}
MAX_STEPS = 400


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer: PreTrainedTokenizerFast, vocab: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.vocab = vocab

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def sampler(self, compiled: Any) -> tuple[Callable[[], torch.Tensor], Callable[[int], bool], Callable[[], bool]]:
        matcher = self.xgr.GrammarMatcher(compiled)
        bitmask = self.xgr.allocate_token_bitmask(1, self.vocab)
        logits = torch.zeros((1, self.vocab))

        def mask() -> torch.Tensor:
            matcher.fill_next_token_bitmask(bitmask)
            out = logits.clone()
            self.xgr.apply_token_bitmask_inplace(out, bitmask)
            return out[0]

        return mask, matcher.accept_token, matcher.is_terminated


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer: PreTrainedTokenizerFast, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.vocab = vocab

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        matcher = self.ll.LLMatcher(self.tokenizer, grammar)  # compiles lazily: the first mask does the work
        self.ll.torch.fill_next_token_bitmask(matcher, self.ll.torch.allocate_token_bitmask(1, self.vocab), 0)
        return grammar

    def sampler(self, compiled: Any) -> tuple[Callable[[], torch.Tensor], Callable[[int], bool], Callable[[], bool]]:
        matcher = self.ll.LLMatcher(self.tokenizer, compiled)
        bitmask = self.ll.torch.allocate_token_bitmask(1, self.vocab)
        logits = torch.zeros((1, self.vocab))

        def mask() -> torch.Tensor:
            self.ll.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            out = logits.clone()
            self.ll.torch.apply_token_bitmask_inplace(out, bitmask)
            return out[0]

        return mask, matcher.consume_token, matcher.is_stopped


def measure(lib: Any, tokenizer: PreTrainedTokenizerFast, eos: int, samples: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, schema in SCHEMAS.items():
        started = time.perf_counter()
        compiled = lib.compile(schema)
        compile_ms = (time.perf_counter() - started) * 1e3
        mask_seconds, steps, valid, truncated = 0.0, 0, 0, 0
        rng = random.Random(0)
        for _ in range(samples):
            mask, accept, done = lib.sampler(compiled)
            out: list[int] = []
            for _ in range(MAX_STEPS):
                started = time.perf_counter()
                allowed = (mask() == 0).nonzero().flatten().tolist()
                mask_seconds += time.perf_counter() - started
                steps += 1
                token = rng.choice(allowed)
                if token == eos:
                    break
                assert accept(token), f"{lib.name} refused a token it allowed"
                out.append(token)
                if done():
                    break
            else:
                truncated += 1
                continue
            text = tokenizer.decode(out)
            try:
                jsonschema.validate(json.loads(text), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError) as exc:
                print(f"  {lib.name} {name}: INVALID {text!r}: {str(exc).splitlines()[0]}")
        result[name] = {"compile_ms": round(compile_ms, 1), "mask_us": round(mask_seconds / steps * 1e6, 1),
                        "valid": valid, "complete": samples - truncated}
    return result


def model_vocab(folder: str, tokens: int) -> int:
    """The logits width: the model's ``vocab_size`` when the folder has a config (padded past the tokenizer)."""
    try:
        with open(f"{folder}/config.json") as f:
            return int(json.load(f)["vocab_size"])
    except FileNotFoundError:
        return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", action="append", required=True, help="folder with tokenizer.json")
    parser.add_argument("--samples", type=int, default=20)
    args = parser.parse_args()
    summary: dict[str, Any] = {}
    for folder in args.tokenizer:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{folder}/tokenizer.json", eos_token="<|im_end|>")
        vocab = model_vocab(folder, len(tokenizer))
        for cls in (XGrammar, LLGuidance):
            started = time.perf_counter()
            lib = cls(tokenizer, vocab)
            setup_ms = (time.perf_counter() - started) * 1e3
            rows = measure(lib, tokenizer, tokenizer.eos_token_id, args.samples)
            print(f"vocab {vocab} {cls.name}: tokenizer setup {setup_ms:.0f} ms")
            for name, row in rows.items():
                print(f"  {name:13} compile {row['compile_ms']:8.1f} ms  mask {row['mask_us']:8.1f} us/token"
                      f"  valid {row['valid']}/{row['complete']} complete of {args.samples}")
            summary[f"{cls.name}@{vocab}"] = {"setup_ms": round(setup_ms), **rows}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
