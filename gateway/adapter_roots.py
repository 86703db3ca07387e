"""The run folders under ``--adapter-root``, read off the event loop and reused for a while.

Listing every run folder (and every ``checkpoint-N`` in it) means reading each folder's config, the header of its
weights and its training arguments: ~1 ms a folder, 110 ms for 100 folders, which on the event loop stalled every
stream for each ``GET /v1/models``. ``RootListing`` instead

- reads the roots in a worker thread, at most once per ``interval`` seconds (``--adapter-scan-interval``,
  default 5): a listing is never older than that, and concurrent listings share one read;
- inspects a folder again only when its files changed (name, size, mtime of each entry), so a re-read of 100
  unchanged folders costs a directory walk.

A new run folder appears in listings at the first listing after ``interval`` seconds. A request that names a
folder does not wait for any listing: ``AdapterPool.resolve`` checks that one folder directly.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

import anyio

from gateway.adapter_files import confine, is_adapter_folder
from gateway.errors import AdapterLoadError

T = TypeVar("T")
Signature = tuple[tuple[str, int, int], ...]


def folder_signature(folder: Path) -> Signature:
    """What changes when anything in ``folder`` is written: each entry's name, size and mtime."""
    entries = []
    with os.scandir(folder) as scan:
        for entry in scan:
            stat = entry.stat()
            entries.append((entry.name, stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


def run_folders(roots: Sequence[Path]) -> list[tuple[str, Path]]:
    """``(name, folder)`` of run folders (and their ``checkpoint-N``) directly under each root."""
    found: list[tuple[str, Path]] = []
    for root in roots:
        if not root.is_dir():
            continue
        for run in sorted(p for p in root.iterdir() if p.is_dir()):
            for folder in (run, *sorted(run.glob("checkpoint-*"))):
                name = folder.relative_to(root).as_posix()
                try:
                    real = confine(name, [root])  # a symlink out of the root is not served
                except AdapterLoadError:
                    continue
                if is_adapter_folder(real):
                    found.append((name, real))
    return found


class RootListing(Generic[T]):
    """``adapters``: what ``inspect(name, folder)`` made of each folder at the last read (``None``s left out)."""

    def __init__(self, roots: Sequence[Path], inspect: Callable[[str, Path], T | None], interval: float) -> None:
        self.roots = tuple(roots)
        self.adapters: list[T] = []
        self._inspect = inspect
        self._interval = interval
        self._read_at: float | None = None
        self._reading: asyncio.Future[None] | None = None
        self._seen: dict[tuple[str, Path], tuple[Signature, T | None]] = {}

    async def refresh(self) -> bool:
        """Read the roots again if the last read is older than the interval; ``True`` if a read happened."""
        if not self.roots:
            return False
        if self._read_at is not None and time.monotonic() - self._read_at < self._interval:
            return False
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
        reading = self._reading
        try:
            await asyncio.shield(reading)  # a caller that goes away does not cancel the others' read
        finally:
            if reading.done() and self._reading is reading:
                self._reading = None
        return True

    async def _read(self) -> None:
        started = time.monotonic()
        self.adapters = await anyio.to_thread.run_sync(self._scan)
        self._read_at = started

    def _scan(self) -> list[T]:
        seen: dict[tuple[str, Path], tuple[Signature, T | None]] = {}
        found = []
        for name, folder in run_folders(self.roots):
            try:
                signature = folder_signature(folder)
            except OSError:
                continue  # removed while we looked
            previous = self._seen.get((name, folder))
            entry = previous[1] if previous is not None and previous[0] == signature else self._inspect(name, folder)
            seen[(name, folder)] = (signature, entry)
            if entry is not None:
                found.append(entry)
        self._seen = seen
        return found
