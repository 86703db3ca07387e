"""Where responses, scores and votes are kept: the ``FeedbackStore`` interface and its SQLite implementation.

The SQLite store is one file (WAL journal, so readers never block the writer and several gateway processes may
share it; a busy timeout makes concurrent writers wait instead of failing). All database work runs in a worker
thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import anyio

Outcome = Literal["a", "b", "tie", "both_bad"]
Status = Literal["ok", "error", "cancelled"]
T = TypeVar("T")


@dataclass(frozen=True)
class ResponseRecord:
    """One answered (or failed) request, as feedback can refer to it."""

    id: str
    endpoint: str  # "chat", "completion"
    model: str  # the served model that ran it (the variant, for a route)
    route: str | None
    prompt_hash: str  # sha256 of the exact prompt text
    sampling: dict[str, Any]
    status: Status
    latency_s: float
    ttft_s: float | None
    prompt_tokens: int
    completion_tokens: int
    created: float = field(default_factory=time.time)
    error: str | None = None
    prompt: str | None = None  # only with feedback_store_text
    output: str | None = None

    @property
    def variant(self) -> str | None:
        return self.model if self.route is not None else None


@dataclass(frozen=True)
class Battle:
    """A pairwise vote, as the models it compared: ``outcome`` is relative to ``model_a`` / ``model_b``."""

    model_a: str
    model_b: str
    outcome: Outcome


@dataclass(frozen=True)
class Served:
    """The figures of one response for the per-variant table, with its score if it got one."""

    route: str | None
    model: str
    status: Status
    latency_s: float
    completion_tokens: int
    score: float | None


class FeedbackStore(Protocol):
    """Responses and the feedback given on them. Scores are kept in [0, 1] (a thumbs-down is 0)."""

    async def record(self, response: ResponseRecord) -> None: ...

    async def find(self, ids: Sequence[str]) -> dict[str, ResponseRecord]:
        """The records of those ``ids`` that exist."""
        ...

    async def score(self, response_id: str, value: float) -> None:
        """Set the score of a response (a second score replaces the first)."""
        ...

    async def vote(self, response_a: str, response_b: str, outcome: Outcome) -> None:
        """Record a pairwise vote; a second vote on the same pair (either order) replaces the first."""
        ...

    async def battles(self) -> list[Battle]: ...

    async def served(self) -> list[Served]: ...

    async def aclose(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, created REAL NOT NULL, endpoint TEXT NOT NULL, route TEXT, model TEXT NOT NULL,
    prompt_hash TEXT NOT NULL, sampling TEXT NOT NULL, status TEXT NOT NULL, latency_s REAL NOT NULL, ttft_s REAL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, error TEXT, prompt TEXT, output TEXT);
CREATE TABLE IF NOT EXISTS scores (
    response_id TEXT PRIMARY KEY REFERENCES responses(id), score REAL NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS votes (
    pair TEXT PRIMARY KEY, response_a TEXT NOT NULL REFERENCES responses(id),
    response_b TEXT NOT NULL REFERENCES responses(id), outcome TEXT NOT NULL, created REAL NOT NULL);
"""
_COLUMNS = ("id", "created", "endpoint", "route", "model", "prompt_hash", "sampling", "status", "latency_s", "ttft_s",
            "prompt_tokens", "completion_tokens", "error", "prompt", "output")
_INSERT = f"INSERT OR REPLACE INTO responses ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"


def default_path() -> Path:
    import platformdirs

    return platformdirs.user_data_path("lora-gateway") / "feedback.sqlite3"


class SQLiteFeedbackStore:
    """``FeedbackStore`` in one SQLite file (or ``:memory:``). One connection, used by one worker thread at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        self._lock = threading.Lock()
        self._pending: list[tuple[list[Any], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=NORMAL")
        self._connection.executescript(_SCHEMA)

    @classmethod
    async def open(cls, path: str | Path) -> SQLiteFeedbackStore:
        return await anyio.to_thread.run_sync(cls, path)

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return work(self._connection)

        return await anyio.to_thread.run_sync(locked)

    async def record(self, response: ResponseRecord) -> None:
        """Returns once the record is committed. Records that arrive while a write runs are committed together by
        the next one (group commit: one thread hop and one transaction for a burst of responses)."""
        values = [getattr(response, c) for c in _COLUMNS]
        values[_COLUMNS.index("sampling")] = json.dumps(response.sampling, sort_keys=True)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((values, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_pending())
        await future

    async def _write_pending(self) -> None:
        def insert(rows: list[list[Any]]) -> Callable[[sqlite3.Connection], None]:
            def work(db: sqlite3.Connection) -> None:
                db.execute("BEGIN")
                try:
                    db.executemany(_INSERT, rows)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            return work

        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._run(insert([values for values, _ in batch]))
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)
        finally:
            self._writer = None

    async def find(self, ids: Sequence[str]) -> dict[str, ResponseRecord]:
        wanted = list(dict.fromkeys(ids))

        def select(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
            marks = ", ".join("?" * len(wanted))
            return db.execute(f"SELECT {', '.join(_COLUMNS)} FROM responses WHERE id IN ({marks})", wanted).fetchall()

        found = {}
        for values in await self._run(select):
            row = dict(zip(_COLUMNS, values, strict=True))
            row["sampling"] = json.loads(row["sampling"])
            found[row["id"]] = ResponseRecord(**row)
        return found

    async def score(self, response_id: str, value: float) -> None:
        await self._run(lambda db: db.execute(
            "INSERT INTO scores (response_id, score, created) VALUES (?, ?, ?) ON CONFLICT(response_id) DO UPDATE "
            "SET score = excluded.score, created = excluded.created", (response_id, value, time.time())))

    async def vote(self, response_a: str, response_b: str, outcome: Outcome) -> None:
        pair = "\x1f".join(sorted((response_a, response_b)))
        await self._run(lambda db: db.execute(
            "INSERT INTO votes (pair, response_a, response_b, outcome, created) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(pair) DO UPDATE SET response_a = excluded.response_a, response_b = excluded.response_b, "
            "outcome = excluded.outcome, created = excluded.created",
            (pair, response_a, response_b, outcome, time.time())))

    async def battles(self) -> list[Battle]:
        rows = await self._run(lambda db: db.execute(
            "SELECT a.model, b.model, v.outcome FROM votes v JOIN responses a ON a.id = v.response_a "
            "JOIN responses b ON b.id = v.response_b ORDER BY v.created").fetchall())
        return [Battle(a, b, outcome) for a, b, outcome in rows]

    async def served(self) -> list[Served]:
        rows = await self._run(lambda db: db.execute(
            "SELECT r.route, r.model, r.status, r.latency_s, r.completion_tokens, s.score FROM responses r "
            "LEFT JOIN scores s ON s.response_id = r.id").fetchall())
        return [Served(*row) for row in rows]

    async def aclose(self) -> None:
        if self._writer is not None:
            await self._writer
        await self._run(lambda db: db.close())
