"""What grammar-constrained decoding costs: a 60-token JSON-schema answer vs. an unconstrained 60-token answer.

Target (issue 11): the constrained answer costs no more than 1.5x the unconstrained one on the demo model. Both runs
generate exactly ``--tokens`` tokens (the schema needs more, so it ends on ``max_tokens``; the plain run ignores
eos), one request at a time and then ``--batch`` at once. The grammar is compiled by the first constrained request
(reported as ``cold``) and taken from the cache afterwards.

    python -m bench.structured_output [--tokens 60] [--repeats 10] [--batch 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from transformers import AutoTokenizer

from backends.base import GenerationRequest, OutputConstraint, SamplingParams
from backends.structured import mask_logits
from backends.torch_native import TorchBackend
from gateway.demo import build_demo

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 16},
        "notes": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 40},
    },
    "required": ["title", "notes"],
    "additionalProperties": False,
}


def request(tokenizer: object, tokens: int, constrained: bool, seed: int) -> GenerationRequest:
    prompt = "<|im_start|>user\n用JSON回答<|im_end|>\n<|im_start|>assistant\n"
    ids = tuple(tokenizer.encode(prompt, add_special_tokens=False))  # type: ignore[attr-defined]
    constraint = OutputConstraint(json.dumps(SCHEMA)) if constrained else None
    sampling = SamplingParams(max_tokens=tokens, temperature=1.0, seed=seed, ignore_eos=not constrained,
                              constraint=constraint)
    return GenerationRequest(f"b{seed}", ids, prompt, None, sampling)


async def timed(backend: TorchBackend, requests: list[GenerationRequest]) -> tuple[float, list[int]]:
    async def one(r: GenerationRequest) -> int:
        count = 0
        async for delta in backend.generate(r):
            count += len(delta.token_ids)
        return count

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(r) for r in requests))
    return time.perf_counter() - started, list(counts)


def mask_step_ms(backend: TorchBackend, tokens: int, rows: int) -> float:
    """Milliseconds per decode step spent in ``mask_logits`` + ``accept`` for ``rows`` constrained rows (the whole
    engine-side cost of a constraint), with tokens drawn uniformly from what each grammar allows."""
    compiler = backend._grammars  # noqa: SLF001  (a bench may look inside)
    assert compiler is not None
    grammars = [compiler.row_grammar(OutputConstraint(json.dumps(SCHEMA)), frozenset({2})) for _ in range(rows)]
    generator = torch.Generator().manual_seed(0)
    spent = 0.0
    for _ in range(tokens):
        logits = torch.zeros((rows, compiler.vocab_size))
        started = time.perf_counter()
        mask_logits(logits, grammars)
        spent += time.perf_counter() - started
        choices = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).flatten().tolist()
        started = time.perf_counter()
        for grammar, token in zip(grammars, choices, strict=True):
            grammar.accept(token)
        spent += time.perf_counter() - started
    return spent / tokens * 1e3


async def run(args: argparse.Namespace) -> dict[str, float]:
    root = Path(args.demo_root) if args.demo_root else Path(tempfile.gettempdir()) / "lora-gateway-bench-demo"
    demo = build_demo(root)
    tokenizer = AutoTokenizer.from_pretrained(demo.base_dir)
    backend = await TorchBackend.load(demo.base_dir, device="cpu", dtype="float32", max_batch_size=args.batch,
                                      pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer)
    try:
        await timed(backend, [request(tokenizer, args.tokens, False, 0)])  # warm the engine
        cold, _ = await timed(backend, [request(tokenizer, args.tokens, True, 0)])
        single: dict[bool, list[float]] = {False: [], True: []}
        for seed in range(args.repeats):
            for constrained in (False, True):
                seconds, counts = await timed(backend, [request(tokenizer, args.tokens, constrained, seed)])
                assert counts == [args.tokens], counts
                single[constrained].append(seconds)
        batch: dict[bool, list[float]] = {False: [], True: []}
        for seed in range(max(2, args.repeats // 3)):
            for constrained in (False, True):
                requests = [request(tokenizer, args.tokens, constrained, seed * 100 + i) for i in range(args.batch)]
                seconds, counts = await timed(backend, requests)
                assert counts == [args.tokens] * args.batch, counts
                batch[constrained].append(seconds)
        mask_one = await asyncio.to_thread(mask_step_ms, backend, args.tokens, 1)
        mask_batch = await asyncio.to_thread(mask_step_ms, backend, args.tokens, args.batch)
    finally:
        await backend.aclose()
    plain, constrained_s = median(single[False]), median(single[True])
    plain_b, constrained_b = median(batch[False]), median(batch[True])
    return {
        "tokens": args.tokens,
        "plain_ms": round(plain * 1e3, 1),
        "constrained_ms": round(constrained_s * 1e3, 1),
        "ratio": round(constrained_s / plain, 3),
        "cold_constrained_ms": round(cold * 1e3, 1),
        "batch": args.batch,
        "batch_plain_ms": round(plain_b * 1e3, 1),
        "batch_constrained_ms": round(constrained_b * 1e3, 1),
        "batch_ratio": round(constrained_b / plain_b, 3),
        "mask_step_ms": round(mask_one, 3),
        "mask_step_ms_batch": round(mask_batch, 3),
        "plain_step_ms": round(plain / args.tokens * 1e3, 3),
        "target_ratio": 1.5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--demo-root", default=None, help="where the demo models are built (default: a temp dir)")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(f"{args.tokens}-token answer, one request: plain {result['plain_ms']} ms, JSON schema "
          f"{result['constrained_ms']} ms, ratio {result['ratio']} (target <= 1.5); first constrained request "
          f"(grammar compile, tokenizer setup) {result['cold_constrained_ms']} ms")
    print(f"{args.batch} requests at once: plain {result['batch_plain_ms']} ms, JSON schema "
          f"{result['batch_constrained_ms']} ms, ratio {result['batch_ratio']}")
    print(f"grammar work per decode step: {result['mask_step_ms']} ms for one row, {result['mask_step_ms_batch']} ms "
          f"for {args.batch} rows (a plain decode step: {result['plain_step_ms']} ms)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
