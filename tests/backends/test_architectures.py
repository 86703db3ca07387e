"""The native backend on every architecture of ``tests.backends.tiny_models``, float32, greedy.

Per architecture: the engine's tokens for the base equal transformers' ``generate``; with a LoRA adapter saved by
peft (``init_lora_weights=False``, the table's targets) and loaded the way the gateway loads it
(``TorchBackend.load_adapter``) they equal peft's ``generate``; and a batch mixing base and adapter rows, half of
them joining while the others decode, gives every row the tokens it gets alone. Prompts are longer than the
sliding window of the windowed models, so the window shapes their answers (checked). Architectures whose cache the
engine cannot carry are refused when the backend starts, through ``TorchBackend.load`` and through a real
``gateway serve``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from backends.base import GenerationRequest, SamplingParams
from backends.lora import LoraBank, read_adapter
from backends.torch_native import TorchBackend
from gateway.errors import AdapterLoadError, BackendUnavailable
from tests.backends.tiny_models import (
    ARCHITECTURES,
    SLIDING_WINDOW,
    VOCAB,
    all_linear_targets,
    build,
)

MAX_TOKENS = 8
PROMPTS = [[(7 * i + 3 * k) % (VOCAB - 10) + 5 for i in range(n)] for k, n in ((1, 14), (2, 9), (3, 20))]
assert all(len(p) + MAX_TOKENS > SLIDING_WINDOW for p in PROMPTS)

# Architectures the engine refuses at start, and a word the refusal must name.
REFUSED = {"falcon_h1": "Mamba"}
DENSE = ["llama", "qwen2", "qwen3", "mistral", "mistral_sliding", "gemma2", "gemma3", "phi3", "glm4", "granite",
         "olmo2", "cohere", "exaone"]
SERVED = [name for name in ARCHITECTURES if name not in REFUSED]


@dataclass
class Built:
    """One architecture on disk, with the reference answers to every prompt."""

    name: str
    base: Path
    adapter: Path
    base_tokens: list[list[int]]  # transformers' generate

    @functools.cached_property
    def adapter_tokens(self) -> list[list[int]]:
        """peft's generate (computed when first asked: a case that fails at load never pays for it)."""
        peft_model = PeftModel.from_pretrained(build(self.name), self.adapter).eval()
        return [_greedy(peft_model, p, VOCAB - 1) for p in PROMPTS]


def _greedy(model: torch.nn.Module, prompt: list[int], eos: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                             do_sample=False, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    return tokens[:-1] if tokens and tokens[-1] == eos else tokens  # the engine does not send the eos it stops on


Builder = Callable[..., Built]  # built(name, targets=None)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Builder:
    """``built(name, targets=None)``: the model and an adapter on ``targets`` (the table's by default), saved once
    per module, with their reference answers."""
    done: dict[tuple[str, tuple[str, ...]], Built] = {}

    def get(name: str, targets: tuple[str, ...] | None = None) -> Built:
        key = (name, targets or ARCHITECTURES[name].targets)
        if key in done:
            return done[key]
        root = tmp_path_factory.mktemp(name)
        model = build(name)
        model.save_pretrained(root / "base")
        eos = VOCAB - 1
        base_tokens = [] if name in REFUSED else [_greedy(model, p, eos) for p in PROMPTS]
        torch.manual_seed(1)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=list(key[1]), init_lora_weights=False)
        get_peft_model(build(name), lora).save_pretrained(root / "adapter")
        done[key] = Built(name, root / "base", root / "adapter", base_tokens)
        return done[key]

    return get


def _request(prompt: list[int], adapter: str | None) -> GenerationRequest:
    return GenerationRequest(request_id="arch", prompt_token_ids=tuple(prompt), prompt_text="", adapter=adapter,
                             sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))


async def _tokens(stream: AsyncIterator[object]) -> list[int]:
    return [t async for delta in stream for t in delta.token_ids]  # type: ignore[attr-defined]


async def _backend(built: Built, *, adapter: bool) -> TorchBackend:
    backend = await TorchBackend.load(built.base, device="cpu", dtype="float32", pad_token_id=0)
    if adapter:
        await backend.load_adapter("tuned", str(built.adapter))
    return backend


async def _batch_joining_late(backend: TorchBackend, rows: list[tuple[list[int], str | None]]) -> list[list[int]]:
    """Run ``rows``: the first half starts and decodes; the second half joins once each of those has a token."""
    half = len(rows) // 2
    early = [backend.generate(_request(p, a)) for p, a in rows[:half]]
    firsts = [await anext(stream) for stream in early]  # decoding now (no answer ends after one token here)
    late = [asyncio.ensure_future(_tokens(backend.generate(_request(p, a)))) for p, a in rows[half:]]
    rests = await asyncio.gather(*(_tokens(stream) for stream in early))
    return [list(f.token_ids) + r for f, r in zip(firsts, rests, strict=True)] + list(await asyncio.gather(*late))


def test_the_table_covers_lora_target_all() -> None:
    """Dense models get exactly LLaMA-Factory's `all`; the others at least that (plus the names peft moves onto the
    fused experts)."""
    for name in ARCHITECTURES:
        found = set(all_linear_targets(build(name)))
        if name in DENSE:
            assert set(ARCHITECTURES[name].targets) == found, name
        elif name not in REFUSED:
            assert set(ARCHITECTURES[name].targets) >= found, name


WINDOWS = ("sliding_window", "attention_chunk_size")


@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if any(ARCHITECTURES[n].options.get(w) for w in WINDOWS)])
def test_the_sliding_window_or_chunk_shapes_the_answers(name: str, built: Builder) -> None:
    """The reference's logits over the longest prompt and its answer change when the window is widened."""
    entry = ARCHITECTURES[name]
    wide = replace(entry, options={**entry.options, **{w: 4096 for w in WINDOWS if entry.options.get(w)}})
    windowed = build(name)
    unwindowed = AutoModelForCausalLM.from_config(wide.config(), dtype=torch.float32).eval()
    unwindowed.load_state_dict(windowed.state_dict())
    longest = max(range(len(PROMPTS)), key=lambda k: len(PROMPTS[k]))
    ids = torch.tensor([PROMPTS[longest] + built(name).base_tokens[longest]])
    with torch.inference_mode():
        assert not torch.allclose(windowed(ids).logits[0, -1], unwindowed(ids).logits[0, -1], atol=1e-3)


@pytest.mark.parametrize("name", SERVED)
async def test_base_equals_transformers_alone_and_batched(name: str, built: Builder) -> None:
    reference = built(name)
    backend = await _backend(reference, adapter=False)
    try:
        alone = [await _tokens(backend.generate(_request(p, None))) for p in PROMPTS]
        together = await asyncio.gather(*(_tokens(backend.generate(_request(p, None))) for p in PROMPTS))
    finally:
        await backend.aclose()
    assert alone == reference.base_tokens
    assert list(together) == reference.base_tokens


@pytest.mark.parametrize("name", SERVED)
async def test_adapter_equals_peft(name: str, built: Builder) -> None:
    reference = built(name)
    backend = await _backend(reference, adapter=True)
    try:
        alone = [await _tokens(backend.generate(_request(p, "tuned"))) for p in PROMPTS]
    finally:
        await backend.aclose()
    assert reference.adapter_tokens != reference.base_tokens  # the adapter changes the answers
    assert alone == reference.adapter_tokens


@pytest.mark.parametrize("name", SERVED)
async def test_mixed_batch_with_late_joins_equals_each_row_alone(name: str, built: Builder) -> None:
    reference = built(name)
    # Every prompt on the base and on the adapter; each half of the batch has both kinds of rows.
    rows = [(PROMPTS[k % len(PROMPTS)], None if k % 2 == 0 else "tuned") for k in range(2 * len(PROMPTS))]
    expected = [reference.base_tokens[PROMPTS.index(p)] if a is None else reference.adapter_tokens[PROMPTS.index(p)]
                for p, a in rows]
    backend = await _backend(reference, adapter=True)
    try:
        got = await _batch_joining_late(backend, rows)
    finally:
        await backend.aclose()
    assert got == expected


@pytest.mark.parametrize("name", list(REFUSED))
async def test_an_unsupported_cache_is_refused_at_load(name: str, built: Builder) -> None:
    with pytest.raises(BackendUnavailable, match=f"cannot serve {name} .*{REFUSED[name]}"):
        await TorchBackend.load(built(name).base, device="cpu", dtype="float32")


@pytest.mark.parametrize("name", list(REFUSED))
def test_gateway_serve_refuses_it_with_one_sentence(name: str, built: Builder) -> None:
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--model", str(built(name).base),
                             "--host", "127.0.0.1", "--port", "0"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "400"})  # the sentence on one line of the usage box
    assert result.returncode != 0
    assert f"cannot serve {name}" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_a_linear_layer_with_its_own_forward_is_refused_at_install(tmp_path: Path) -> None:
    """llama4's router is an nn.Linear subclass returning (scores, logits): a LoRA on it is refused when installed,
    not found out by a failing generation, and the model is left as it was."""
    torch.manual_seed(3)
    get_peft_model(build("llama4"), LoraConfig(r=4, target_modules=["q_proj", "router"],
                                               init_lora_weights=False)).save_pretrained(tmp_path / "router")
    model = build("llama4")
    before = {name for name, _ in model.named_modules()}
    with pytest.raises(AdapterLoadError, match=r"Llama4Router there, an nn.Linear with a forward of its own"):
        LoraBank(model).install(read_adapter("router", str(tmp_path / "router")))
    assert {name for name, _ in model.named_modules()} == before
