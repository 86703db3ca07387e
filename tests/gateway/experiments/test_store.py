"""The SQLite feedback store: survives reopening, replaces a second vote, takes concurrent writers."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path

from gateway.experiments.store import ResponseRecord, SQLiteFeedbackStore


def record(response_id: str, model: str = "pku-assistant", route: str | None = None) -> ResponseRecord:
    return ResponseRecord(id=response_id, endpoint="chat", model=model, route=route, prompt_hash="0" * 64,
                          sampling={"temperature": 0.0}, status="ok", latency_s=0.5, ttft_s=0.1, prompt_tokens=31,
                          completion_tokens=12)


async def test_records_and_votes_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "feedback.sqlite3"
    store = await SQLiteFeedbackStore.open(path)
    await store.record(record("r1", route="bot"))
    await store.record(record("r2", model="tiny-qwen"))
    await store.vote("r1", "r2", "a")
    await store.score("r1", 1.0)
    await store.aclose()
    reopened = await SQLiteFeedbackStore.open(path)
    found = await reopened.find(["r1", "r2", "missing"])
    assert set(found) == {"r1", "r2"}
    assert found["r1"] == replace(record("r1", route="bot"), created=found["r1"].created)
    assert [(b.model_a, b.model_b, b.outcome) for b in await reopened.battles()] == [
        ("pku-assistant", "tiny-qwen", "a")]
    assert [s.score for s in await reopened.served() if s.route == "bot"] == [1.0]
    await reopened.aclose()
    journal = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert journal == "wal"


async def test_a_second_vote_on_the_same_pair_replaces_the_first(tmp_path: Path) -> None:
    store = await SQLiteFeedbackStore.open(tmp_path / "f.sqlite3")
    for rid, model in [("r1", "x"), ("r2", "y"), ("r3", "z")]:
        await store.record(record(rid, model=model))
    await store.vote("r1", "r2", "a")
    await store.vote("r2", "r1", "tie")  # same pair, the other order
    await store.vote("r1", "r3", "b")
    assert sorted((b.model_a, b.model_b, b.outcome) for b in await store.battles()) == [
        ("x", "z", "b"), ("y", "x", "tie")]
    await store.score("r1", 1.0)
    await store.score("r1", 0.0)
    assert [s.score for s in await store.served() if s.model == "x"] == [0.0]
    await store.aclose()


async def test_concurrent_writers_on_one_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    stores = [await SQLiteFeedbackStore.open(path) for _ in range(3)]  # three connections, as three processes

    async def write(store: SQLiteFeedbackStore, prefix: str) -> None:
        await asyncio.gather(*(store.record(record(f"{prefix}-{i}")) for i in range(60)))

    await asyncio.gather(*(write(s, f"w{n}") for n, s in enumerate(stores)))
    ids = [f"w{n}-{i}" for n in range(3) for i in range(60)]
    assert len(await stores[0].find(ids)) == 180
    for store in stores:
        await store.aclose()
