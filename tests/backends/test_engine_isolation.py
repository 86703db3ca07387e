"""A row that breaks an engine step fails alone: its neighbours in the batch finish with the very tokens they
produce alone (real tiny Qwen2, real LoRA adapters, float32)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from backends.base import GenerationRequest
from backends.torch_native import TorchBackend
from gateway.errors import GatewayError
from tests.backends.test_engine import PROMPTS, VOCAB, _backend, _collect, _request, model_dirs  # noqa: F401

NEIGHBOURS = [_request([30, 31, 32], "a", temperature=1.0, seed=7, top_p=0.9),  # sampled: a retried step draws
              *(_request(p, a) for p, a in PROMPTS)]                              # the same tokens for it


async def _outcome(backend: TorchBackend, request: GenerationRequest) -> list[int] | GatewayError:
    try:
        return await _collect(backend, request)
    except GatewayError as exc:
        return exc


async def _in_one_batch(backend: TorchBackend, requests: list[GenerationRequest]) -> list[list[int] | GatewayError]:
    """Run ``requests`` so that they all join the batch in the same step, in this order (no timing luck: the
    engine thread is held in a command until every one of them is queued)."""
    engine = backend._engine
    holding, gate = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        gate.wait()

    held = asyncio.ensure_future(engine.run_command(hold))
    while not holding.is_set():
        await asyncio.sleep(0.001)
    tasks = []
    for request in requests:
        tasks.append(asyncio.ensure_future(_outcome(backend, request)))
        for _ in range(5000):  # queued in this order
            if engine.queue_depth == len(tasks):
                break
            await asyncio.sleep(0.001)
        assert engine.queue_depth == len(tasks), (engine.queue_depth, engine.batch_size, [t.done() for t in tasks])
    gate.set()
    await held
    return list(await asyncio.gather(*tasks))


async def _alone(backend: TorchBackend) -> list[list[int]]:
    return [await _collect(backend, request) for request in NEIGHBOURS]


class _BrokenGrammar:
    """A structured-output row whose token mask cannot be computed (a grammar library failing on one row)."""

    stop_ids = torch.tensor([], dtype=torch.long)

    def fill(self, bitmask: torch.Tensor, index: int) -> None:
        raise RuntimeError("grammar state corrupted")

    def stop_allowed(self) -> bool:
        return True

    def accept(self, token: int) -> bool:
        return False


async def test_a_row_whose_token_choice_fails_fails_alone(model_dirs: dict[str, Path]) -> None:  # noqa: F811
    backend = await _backend(model_dirs)
    bad = _request([40, 41, 42], "b")
    real_grammar = backend._row_grammar

    async def row_grammar(request: GenerationRequest, stop_ids: frozenset[int]) -> Any:
        return _BrokenGrammar() if request is bad else await real_grammar(request, stop_ids)

    backend._row_grammar = row_grammar  # type: ignore[method-assign]  # the fault: one row's choice raises
    try:
        alone = await _alone(backend)
        results = await _in_one_batch(backend, [*NEIGHBOURS[:3], bad, *NEIGHBOURS[3:]])
        after = await _collect(backend, NEIGHBOURS[1])
    finally:
        await backend.aclose()
    assert isinstance(results[3], GatewayError) and "other requests were not affected" in results[3].message
    assert [r for i, r in enumerate(results) if i != 3] == alone
    assert after == alone[1]


async def test_a_row_whose_prefill_fails_fails_alone(model_dirs: dict[str, Path]) -> None:  # noqa: F811
    backend = await _backend(model_dirs)
    try:
        alone = await _alone(backend)
        bad = _request([5, 6, VOCAB + 50], None)  # no such token: the embedding lookup raises in the forward
        results = await _in_one_batch(backend, [NEIGHBOURS[0], bad, *NEIGHBOURS[1:]])
    finally:
        await backend.aclose()
    assert isinstance(results[1], GatewayError)
    assert [r for i, r in enumerate(results) if i != 1] == alone


@contextmanager
def _failing_mid_model(model: torch.nn.Module, when: Callable[[int], bool]) -> Iterator[None]:
    """Make the second decoder layer raise whenever a batch holds a position ``when`` accepts: the first layer has
    already written its cache entry for that step, as a real mid-forward failure leaves it."""
    seen: dict[str, int] = {}

    def note_positions(_: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen["max"] = int(kwargs["position_ids"].max())

    def fail(*_: Any) -> None:
        if when(seen["max"]):
            raise RuntimeError("injected failure in layer 1")

    inner = model.model  # type: ignore[union-attr]
    hooks = [inner.register_forward_pre_hook(note_positions, with_kwargs=True),
             inner.layers[1].register_forward_pre_hook(fail)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


async def test_a_row_whose_decode_forward_fails_mid_model_fails_alone(model_dirs: dict[str, Path]) -> None:  # noqa: F811
    backend = await _backend(model_dirs)
    # The bad row's prompt is 40 tokens: it alone reaches position 43, on its 4th decode step; the neighbours'
    # prompts are at most 7 tokens long, and they stop after 12 tokens.
    bad = _request(list(range(50, 90)), "a", max_tokens=30)
    try:
        with _failing_mid_model(backend._engine.model, lambda position: position >= 43):
            alone = await _alone(backend)
            results = await _in_one_batch(backend, [*NEIGHBOURS[:2], bad, *NEIGHBOURS[2:]])
            after = await _collect(backend, NEIGHBOURS[2])
    finally:
        await backend.aclose()
    assert isinstance(results[2], GatewayError)
    assert [r for i, r in enumerate(results) if i != 2] == alone  # the cache was trimmed back: same tokens
    assert after == alone[2]


@pytest.mark.parametrize("batch", [1, 3])
async def test_a_failure_no_row_reproduces_fails_the_step(model_dirs: dict[str, Path], batch: int) -> None:  # noqa: F811
    """A whole-batch failure (no single row is to blame) fails that step's rows, and the engine keeps serving."""
    backend = await _backend(model_dirs)
    calls = {"n": 0}

    def fail_once(*_: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected transient failure")

    hook = backend._engine.model.model.layers[1].register_forward_pre_hook(fail_once)  # type: ignore[union-attr]
    try:
        results = await _in_one_batch(backend, NEIGHBOURS[:batch])
        hook.remove()
        again = await _collect(backend, NEIGHBOURS[0])
        alone = await _collect(backend, NEIGHBOURS[0])
    finally:
        await backend.aclose()
    assert all(isinstance(r, GatewayError) for r in results)
    assert again == alone
