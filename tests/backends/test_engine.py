"""The native engine with a real (random) Qwen2 and real peft LoRA adapters: batching must not change numbers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from backends.base import Delta, GenerationRequest, SamplingParams
from backends.torch_native import TorchBackend
from gateway.errors import Conflict, InvalidRequest, Overloaded

VOCAB = 256


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine")
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         initializer_range=0.2, max_position_embeddings=256, eos_token_id=VOCAB - 1)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(root / "base")
    dirs = {"base": root / "base"}
    for index, name in enumerate(["a", "b"]):
        torch.manual_seed(100 + index)
        base = Qwen2ForCausalLM.from_pretrained(root / "base")
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(base, lora).save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


async def _backend(dirs: dict[str, Path], **kwargs: int) -> TorchBackend:
    backend = await TorchBackend.load(dirs["base"], device="cpu", dtype="float32", pad_token_id=0, **kwargs)
    for name in ("a", "b"):
        await backend.load_adapter(name, str(dirs[name]))
    return backend


def _request(prompt: list[int], adapter: str | None, max_tokens: int = 12, **sampling: Any) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=sampling.pop("temperature", 0.0), **sampling)
    return GenerationRequest(request_id="t", prompt_token_ids=tuple(prompt), prompt_text="", adapter=adapter,
                             sampling=params)


async def _collect(backend: TorchBackend, request: GenerationRequest, delay: float = 0.0) -> list[int]:
    await asyncio.sleep(delay)
    tokens: list[int] = []
    async for delta in backend.generate(request):
        tokens.extend(delta.token_ids)
    return tokens


PROMPTS = [([5, 6, 7, 8, 9], None), ([10, 11, 12], "a"), ([13, 14, 15, 16, 17, 18, 19], "b"), ([20, 21], "a"),
           ([5, 6, 7, 8, 9], "b")]


async def test_mixed_adapter_batch_equals_each_request_alone(model_dirs: dict[str, Path]) -> None:
    backend = await _backend(model_dirs)
    try:
        alone = [await _collect(backend, _request(p, a)) for p, a in PROMPTS]
        together = await asyncio.gather(*(_collect(backend, _request(p, a)) for p, a in PROMPTS))
        # Late arrivals join a running batch between decode steps (continuous batching).
        staggered = await asyncio.gather(*(_collect(backend, _request(p, a), delay=0.01 * i)
                                           for i, (p, a) in enumerate(PROMPTS)))
    finally:
        await backend.aclose()
    assert all(len(t) == 12 for t in alone)
    assert together == alone
    assert staggered == alone


async def test_adapters_change_the_output(model_dirs: dict[str, Path]) -> None:
    backend = await _backend(model_dirs)
    try:
        prompt = [5, 6, 7, 8, 9]
        outputs = {a: await _collect(backend, _request(prompt, a)) for a in (None, "a", "b")}
    finally:
        await backend.aclose()
    assert outputs[None] != outputs["a"] != outputs["b"] != outputs[None]


async def test_seeded_sampling_is_reproducible_in_any_batch(model_dirs: dict[str, Path]) -> None:
    backend = await _backend(model_dirs)
    try:
        request = _request([30, 31, 32], "a", temperature=1.0, seed=7, top_p=0.9, top_k=50)
        alone = await _collect(backend, request)
        others = (_collect(backend, _request(p, a)) for p, a in PROMPTS)
        crowd = await asyncio.gather(_collect(backend, request), *others)
        other_seed = await _collect(backend, _request([30, 31, 32], "a", temperature=1.0, seed=8, top_p=0.9))
    finally:
        await backend.aclose()
    assert crowd[0] == alone
    assert other_seed != alone


async def test_closing_the_stream_frees_the_row(model_dirs: dict[str, Path]) -> None:
    backend = await _backend(model_dirs)
    try:
        stream = backend.generate(_request([5, 6, 7], None, max_tokens=200))
        await anext(stream)
        await anext(stream)
        assert backend._engine.batch_size == 1
        await stream.aclose()
        for _ in range(100):
            if backend._engine.batch_size == 0:
                break
            await asyncio.sleep(0.01)
        assert backend._engine.batch_size == 0
    finally:
        await backend.aclose()


async def test_full_queue_is_refused(model_dirs: dict[str, Path]) -> None:
    # A context long enough that the running request cannot finish while the test fills the queue.
    backend = await _backend(model_dirs, max_batch_size=1, max_queue=1, max_model_len=100_000)
    try:
        streams = [backend.generate(_request([5, 6, 7], None, max_tokens=50_000, ignore_eos=True)) for _ in range(3)]
        await anext(streams[0])  # running
        waiting = asyncio.ensure_future(anext(streams[1]))  # queued behind it
        for _ in range(500):
            if backend._engine.queue_depth == 1:
                break
            await asyncio.sleep(0.002)
        assert backend._engine.queue_depth == 1
        with pytest.raises(Overloaded):
            await anext(streams[2])
        await streams[0].aclose()
        await waiting  # the queued one gets its turn
        await streams[1].aclose()
    finally:
        await backend.aclose()


async def test_length_and_stop_token(model_dirs: dict[str, Path]) -> None:
    backend = await _backend(model_dirs)
    try:
        free = await _collect(backend, _request([5, 6, 7, 8, 9], None, max_tokens=12))
        stop_id = free[3]
        request = GenerationRequest(request_id="s", prompt_token_ids=(5, 6, 7, 8, 9), prompt_text="", adapter=None,
                                    sampling=SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop_id,)))
        finishes = [d.finish_reason async for d in backend.generate(request)]
        stopped = await _collect(backend, request)
    finally:
        await backend.aclose()
    assert stopped == free[: free.index(stop_id)]
    assert finishes[-1] == "stop"


async def test_loads_and_unloads_between_steps_leave_running_rows_alone(model_dirs: dict[str, Path]) -> None:
    backend = await _backend(model_dirs)
    try:
        alone = {a: await _collect(backend, _request([5, 6, 7, 8], a, max_tokens=200)) for a in ("a", None)}
        streams = {a: backend.generate(_request([5, 6, 7, 8], a, max_tokens=200)) for a in ("a", None)}
        got: dict[str | None, list[int]] = {a: list((await anext(s)).token_ids) for a, s in streams.items()}
        for _ in range(3):  # churn other slots while both rows decode
            await backend.unload_adapter("b")
            await backend.load_adapter("b", str(model_dirs["b"]))
            await backend.load_adapter("c", str(model_dirs["a"]))
            await backend.unload_adapter("c")
        with pytest.raises(Conflict):
            await backend.unload_adapter("a")  # rows are using it
        with pytest.raises(Conflict):
            await backend.load_adapter("a", str(model_dirs["b"]))  # nor can other weights replace it
        for adapter, stream in streams.items():
            got[adapter] += [t async for d in stream for t in d.token_ids]
        await backend.unload_adapter("a")  # idle now
        with pytest.raises(InvalidRequest):
            await _collect(backend, _request([5, 6], "a"))
    finally:
        await backend.aclose()
    assert got == alone


async def test_max_tokens_is_capped_by_the_context(model_dirs: dict[str, Path]) -> None:
    backend = await _backend(model_dirs)  # max_position_embeddings=256
    try:
        request = _request([5, 6, 7], "a", max_tokens=10_000, ignore_eos=True)
        deltas = [d async for d in backend.generate(request)]
    finally:
        await backend.aclose()
    assert deltas[-1].finish_reason == "length"
    assert 3 + sum(len(d.token_ids) for d in deltas) == 256


async def test_running_and_waiting_rows_per_adapter(model_dirs: dict[str, Path]) -> None:
    """What ``vllm:lora_requests_info`` reads on the native engine: rows in the batch vs waiting for a slot."""
    from gateway.request_context import RequestContext, activate, deactivate

    backend = await _backend(model_dirs, max_batch_size=1)
    try:
        ctx = RequestContext(request_id="q", method="POST", path="/v1/completions")
        token = activate(ctx)
        first = backend.generate(_request([5, 6, 7], "a", max_tokens=200, ignore_eos=True))
        await anext(first)  # "a" is in the batch, decoding
        deactivate(token)
        second = asyncio.ensure_future(_collect(backend, _request([8, 9], "b", max_tokens=2)))
        await asyncio.sleep(0.05)
        assert backend.adapter_requests() == ({"a": 1}, {"b": 1})
        await first.aclose()  # frees the only slot: "b" runs, then ends
        assert len(await second) == 2
        assert backend.adapter_requests() == ({}, {})
        assert ctx.engine_queue_seconds is not None and ctx.engine_queue_seconds >= 0
    finally:
        await backend.aclose()
async def _collect_deltas(backend: TorchBackend, request: GenerationRequest) -> list[Delta]:
    return [delta async for delta in backend.generate(request)]


async def test_every_knob_per_row_alone_equals_in_a_mixed_batch(model_dirs: dict[str, Path]) -> None:
    backend = await _backend(model_dirs)
    knobs = {"frequency_penalty": 0.4, "presence_penalty": 0.2, "repetition_penalty": 1.2, "min_p": 0.05,
             "logit_bias": ((17, 3.0), (18, -100.0)), "logprobs": 3, "top_p": 0.9, "top_k": 40}
    try:
        request = _request([30, 31, 32, 18], "a", max_tokens=16, temperature=0.9, seed=11, **knobs)
        alone = await _collect_deltas(backend, request)
        others = [_collect_deltas(backend, _request(p, a, max_tokens=16, **extra)) for (p, a), extra in zip(
            PROMPTS, [{}, {"temperature": 1.2, "seed": 3}, {"repetition_penalty": 1.5}, {"logprobs": 1},
                      {"frequency_penalty": -1.0, "temperature": 0.7}], strict=True)]
        crowd = await asyncio.gather(*others[:2], _collect_deltas(backend, request), *others[2:])
        echo = await _collect_deltas(backend, _request([30, 31, 32, 18], None, max_tokens=2, prompt_logprobs=2))
    finally:
        await backend.aclose()
    # Same tokens; logprobs equal up to float32 rounding of the batched forward pass (|diff| ~ 1e-6).
    assert [d.token_ids for d in crowd[2]] == [d.token_ids for d in alone]
    pairs = zip([e for d in crowd[2] for e in d.logprobs], [e for d in alone for e in d.logprobs], strict=True)
    assert all(a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4 for a, b in pairs)
    tokens = [t for d in alone for t in d.token_ids]
    assert 18 not in tokens  # banned
    assert [e.token_id for d in alone for e in d.logprobs][: len(tokens)] == tokens
    assert all(len(e.top) == 3 and e.logprob <= 0 for d in alone for e in d.logprobs)
    prompt = echo[0].prompt_logprobs
    assert prompt is not None and prompt[0] is None and [e.token_id for e in prompt[1:] if e] == [31, 32, 18]


async def test_logprobs_are_the_models_log_softmax_after_bias(model_dirs: dict[str, Path]) -> None:
    backend = await _backend(model_dirs)
    try:
        deltas = await _collect_deltas(backend, _request([5, 6, 7], None, max_tokens=4, logprobs=2,
                                                         logit_bias=((9, 1.5),)))
    finally:
        await backend.aclose()
    model = Qwen2ForCausalLM.from_pretrained(model_dirs["base"]).eval()
    ids = [5, 6, 7]
    for entry in [e for d in deltas for e in d.logprobs]:
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, -1].clone()
            logits[9] += 1.5
        reference = torch.log_softmax(logits, dim=-1)
        assert entry.token_id == int(torch.argmax(reference))
        assert abs(entry.logprob - float(reference[entry.token_id])) < 1e-4
        assert [i for i, _ in entry.top] == torch.topk(reference, 2).indices.tolist()
        ids.append(entry.token_id)
