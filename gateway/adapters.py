"""Which adapters are resident in the backend, and the rules for loading, evicting and unloading them.

``AdapterPool`` is built in the app's lifespan and kept on ``GatewayState.adapters``. It knows every adapter the
gateway can serve — configured (``--adapter``), loaded through the admin API, or found under an ``--adapter-root``
— and which of them the backend holds now. Routes never talk to the backend about adapters; they ask the pool::

    async with pool.leased("pku-assistant") as lease:   # loads it first if needed (maybe evicting an idle one)
        ... generate with lease.target ...   # lease.keep() hands the hold to a stream that outlives the block

Contracts:

- A request only runs on a *loaded* adapter, and an adapter with leases (requests in flight) is never evicted or
  unloaded: ``unload`` raises ``Conflict`` (409) while requests are in flight, eviction picks only idle adapters.
- ``--max-adapters N``: before a load that would exceed N resident adapters, the least recently used idle,
  unpinned adapter is evicted. When all are busy the load waits for one to become idle, then raises ``Overloaded``.
- One lock per name: concurrent loads of one name load once; loading a name already loaded from the same folder
  returns at once; from another folder is a ``Conflict``.
- Every check (path inside the roots, safetensors only, shapes fit the base) runs before the backend is touched;
  a refused adapter leaves everything as it was.
- A configured adapter that fails its checks or that the backend refuses at start-up (DoRA on the native backend,
  say) does not stop the server: it is kept in state ``refused`` with its reason, listed, and requests for it get
  that reason as a 422 (``adapter_refused``).
- Under a root, the name of a run folder is its path relative to the root: ``RUN`` or ``RUN/checkpoint-N``; other
  spellings of that path (``./RUN``, ``RUN/.``, ``RUN//``) name the same adapter, never another resident copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio

from backends.base import Backend
from gateway.adapter_files import AdapterInfo, BaseShapes, confine, inspect_adapter, is_adapter_folder
from gateway.adapter_roots import RootListing
from gateway.errors import AdapterLoadError, Conflict, GatewayError, ModelNotFound, Overloaded
from gateway.metrics import Metrics
from gateway.registry import Registry, Target
from gateway.templates import ResolvedTemplate

log = logging.getLogger(__name__)

AdapterState = Literal["loaded", "on_disk", "loading", "unloading", "refused"]
AdapterSource = Literal["config", "api", "root"]
TemplateResolver = Callable[[Path, "str | None"], ResolvedTemplate]  # (adapter folder, explicit name) -> template
SLOT_WAIT_SECONDS = 30.0  # how long a load waits for a busy adapter to become evictable before 429


def placeholder_info(folder: Path) -> AdapterInfo:
    """What is listed for a configured folder that failed its checks: its path, nothing read from it."""
    return AdapterInfo(path=folder, rank=0, target_modules=(), size_bytes=0, base_model=None, safetensors=False)


def canonical_name(model: str) -> str:
    """The one name of a run folder under a root: ``./RUN//checkpoint-5/.`` -> ``RUN/checkpoint-5``."""
    return "/".join(part for part in model.split("/") if part not in ("", "."))


@dataclass(eq=False)
class Adapter:
    """One known adapter and its residency. Mutated only on the event loop, by the pool."""

    name: str
    info: AdapterInfo
    template: ResolvedTemplate
    source: AdapterSource
    pinned: bool = False
    state: AdapterState = "on_disk"
    in_flight: int = 0
    last_used: float | None = None
    loads: int = 0  # how many times the backend loaded it
    reason: str | None = None  # why a configured adapter is refused (state "refused"): the backend cannot serve it

    def refusal(self) -> AdapterLoadError:
        """The 422 a request for a refused adapter gets."""
        return AdapterLoadError(f"adapter {self.name!r} cannot be served: {self.reason}", param="model",
                                code="adapter_refused")


class Lease:
    """A request's hold on its target; while held, the target's adapter stays loaded. ``release`` is idempotent."""

    def __init__(self, pool: AdapterPool, target: Target, adapter: Adapter | None) -> None:
        self.target = target
        self._pool = pool
        self._adapter = adapter
        self._held = adapter is not None
        self._kept = False

    def keep(self) -> None:
        """Hand the hold on to whoever releases it later (a stream that outlives the ``leased`` block)."""
        self._kept = True

    def release(self) -> None:
        if self._held and self._adapter is not None:
            self._held = False
            self._adapter.in_flight -= 1
            self._pool._changed()


class AdapterPool:
    def __init__(self, backend: Backend, registry: Registry, *, roots: Sequence[Path] = (),
                 shapes: BaseShapes | None = None, base_names: Iterable[str] = (), max_adapters: int | None = None,
                 pins: Iterable[str] = (), allow_unsafe: bool = False, resolve_template: TemplateResolver,
                 clock: Callable[[], float] = time.time, metrics: Metrics | None = None,
                 scan_interval: float = 5.0) -> None:
        self.backend = backend
        self.registry = registry
        self.roots = tuple(roots)
        self.max_adapters = max_adapters
        self.pins = frozenset(pins)
        self._shapes = shapes
        self._base_names = tuple(base_names)
        self._allow_unsafe = allow_unsafe
        self._resolve_template = resolve_template
        self._clock = clock
        self._adapters: dict[str, Adapter] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._change = asyncio.Event()
        self._metrics = metrics
        self._roots_view = RootListing(self.roots, self._inspect_listed, scan_interval)

    # --- start-up -------------------------------------------------------------------------------------------------

    async def start(self, configured: Sequence[tuple[str, Path, ResolvedTemplate]]) -> None:
        """Register the configured adapters and load the pinned ones, then others while there is room. An adapter
        that cannot be served is kept as ``refused`` (logged once), and the rest are served."""
        for name, path, template in configured:
            try:
                info = await self._inspect(path.resolve())
            except AdapterLoadError as exc:
                self._refuse(self._register(name, placeholder_info(path.resolve()), template, "config"), exc)
                continue
            self._register(name, info, template, "config")
        for name in sorted(self.pins - set(self._adapters)):
            if self._discover(name) is None:
                raise AdapterLoadError(f"--pin {name}: no adapter of that name is configured or under a root")
        for adapter in sorted(self._adapters.values(), key=lambda a: not a.pinned):
            if adapter.state == "refused":
                continue
            if adapter.pinned or self.max_adapters is None or self._resident() < self.max_adapters:
                try:
                    await self._ensure_loaded(adapter)
                except AdapterLoadError as exc:
                    self._refuse(adapter, exc)
        await self.refresh_catalog()
        self._report()

    # --- serving --------------------------------------------------------------------------------------------------

    def resolve(self, model: str) -> Target:
        """The target ``model`` names (base, adapter, or run folder under a root), loaded or not; 404 if unknown."""
        if model not in self.registry and self.roots:
            canonical = canonical_name(model)
            if canonical and (canonical in self.registry or self._discover(canonical) is not None):
                return self.registry.resolve(canonical)
        return self.registry.resolve(model)  # raises ModelNotFound with the list of served models

    @asynccontextmanager
    async def leased(self, model: str) -> AsyncIterator[Lease]:
        """``acquire`` for the length of a block: released at its end, unless ``keep()`` handed it on."""
        lease = await self.acquire(model)
        try:
            yield lease
        finally:
            if not lease._kept:
                lease.release()

    async def acquire(self, model: str) -> Lease:
        """A lease on ``model`` (see ``resolve``), its adapter loaded."""
        while True:
            target = self.resolve(model)
            if target.adapter is None:
                return Lease(self, target, None)
            adapter = self._adapters.get(target.adapter)
            if adapter is None:  # the registry and the pool change together, without an await in between
                raise ModelNotFound(f"The model `{model}` does not exist.", param="model")
            if adapter.state == "refused":
                raise adapter.refusal()
            if adapter.state != "loaded":
                await self._ensure_loaded(adapter)
                continue  # re-check: it may have been unloaded meanwhile
            adapter.in_flight += 1
            adapter.last_used = self._clock()
            return Lease(self, target, adapter)

    # --- admin ----------------------------------------------------------------------------------------------------

    async def load(self, name: str, path: str, *, template: str | None = None, base: str | None = None) -> Adapter:
        """Load ``path`` as ``name`` (admin API). Idempotent for the same folder; ``Conflict`` for another one."""
        if not name or name != name.strip() or name.startswith("/") or ".." in name.split("/"):
            raise AdapterLoadError(f"{name!r} is not a valid adapter name", param="name")
        if base is not None and base not in {self.registry.base_name, *self._base_names}:
            raise AdapterLoadError(f"base {base!r} is not served here; the base is {self.registry.base_name!r}",
                                   param="base")
        real = confine(path, self.roots)
        async with self._lock(name):
            existing = self._adapters.get(name)
            if existing is not None and existing.info.path != real:
                raise Conflict(f"adapter {name!r} is already loaded from {existing.info.path}; unload it first",
                               param="name")
            if existing is None:
                info = await self._inspect(real)
                existing = self._register(name, info, self._template(real, template), "api")
            try:
                await self._load_locked(existing)
            except BaseException:
                if existing.source == "api" and existing.state == "on_disk" and existing.loads == 0:
                    self._forget(existing)
                raise
            return existing

    async def unload(self, name: str) -> None:
        """Unload and forget ``name``; ``Conflict`` while it has requests in flight, 404 if unknown."""
        adapter = self._known(name)
        async with self._lock(name):
            if self._adapters.get(name) is not adapter:
                raise ModelNotFound(f"adapter {name!r} is not loaded", param="name")
            if adapter.in_flight:
                raise Conflict(f"adapter {name!r} has {adapter.in_flight} requests in flight; retry when they finish",
                               param="name")
            while adapter.state == "unloading":  # being evicted right now
                await self._change.wait()
            if adapter.state == "loaded":
                await self._evict(adapter)
            self._forget(adapter)

    def catalog(self) -> list[Adapter]:
        """Every adapter: the known ones, then those under a root not yet used (state ``on_disk``), as of the last
        read of the roots (``refresh_catalog``)."""
        found = dict(self._adapters)
        for adapter in self._roots_view.adapters:
            if adapter.name not in found and adapter.name not in self.registry:
                found[adapter.name] = adapter
        return list(found.values())

    async def refresh_catalog(self) -> None:
        """Read the roots again (in a thread) when the last read is older than the scan interval."""
        if await self._roots_view.refresh():
            self._report()

    def _inspect_listed(self, name: str, folder: Path) -> Adapter | None:
        """An ``on_disk`` entry for a folder under a root (runs in the listing's thread), ``None`` if refused."""
        try:
            info = inspect_adapter(folder, self._shapes, base_names=self._base_names, allow_unsafe=self._allow_unsafe)
            return Adapter(name, info, self._template(folder, None), "root", name in self.pins)
        except GatewayError as exc:
            log.debug("not listing %s: %s", folder, exc)
            return None

    def _report(self) -> None:
        if self._metrics is not None:
            adapters = self.catalog()
            self._metrics.residency(self._resident(), sum(a.state == "on_disk" for a in adapters))
    def refusal_reason(self, name: str) -> str | None:
        """Why the adapter ``name`` is refused, or ``None`` when it is served (or unknown)."""
        adapter = self._adapters.get(name)
        return adapter.reason if adapter is not None and adapter.state == "refused" else None

    def targets(self) -> list[Target]:
        """Everything a request may name, including run folders under the roots not loaded yet."""
        served = list(self.registry)
        known = {t.name for t in served}
        for adapter in self.catalog():
            if adapter.name not in known:
                served.append(Target(adapter.name, self.registry.base_name, adapter.name, str(adapter.info.path),
                                     adapter.template.template, adapter.template.source))
        return served

    # --- internals ------------------------------------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _known(self, name: str) -> Adapter:
        adapter = self._adapters.get(name)
        if adapter is None:
            raise ModelNotFound(f"adapter {name!r} is not loaded", param="name")
        return adapter

    def _changed(self) -> None:
        """Wake everyone waiting for an adapter to become idle or for a state change."""
        self._change.set()
        self._change = asyncio.Event()

    def _resident(self) -> int:
        return sum(a.state in ("loaded", "loading", "unloading") for a in self._adapters.values())

    def _refuse(self, adapter: Adapter, exc: AdapterLoadError) -> None:
        adapter.state, adapter.reason = "refused", exc.message
        log.error("not serving adapter %s: %s (serving the rest)", adapter.name, exc.message)
        self._changed()

    def _template(self, folder: Path, explicit: str | None) -> ResolvedTemplate:
        return self._resolve_template(folder, explicit)

    async def _inspect(self, folder: Path) -> AdapterInfo:
        return await anyio.to_thread.run_sync(
            lambda: inspect_adapter(folder, self._shapes, base_names=self._base_names,
                                    allow_unsafe=self._allow_unsafe))

    def _register(self, name: str, info: AdapterInfo, template: ResolvedTemplate, source: AdapterSource) -> Adapter:
        self.registry.add_adapter(name, info.path, template)  # raises Conflict if the name is taken
        adapter = Adapter(name, info, template, source, pinned=name in self.pins)
        self._adapters[name] = adapter
        return adapter

    def _forget(self, adapter: Adapter) -> None:
        if self._adapters.get(adapter.name) is adapter:
            del self._adapters[adapter.name]
            self.registry.remove_adapter(adapter.name)
        self._changed()
        self._report()

    def _discover(self, name: str) -> Adapter | None:
        """Register the run folder ``name`` under a root (not loaded yet), or ``None`` if there is none."""
        if not self.roots or name in self.registry:
            return self._adapters.get(name)
        try:
            folder = confine(name, self.roots)
        except AdapterLoadError:
            return None
        if not is_adapter_folder(folder):
            return None
        info = inspect_adapter(folder, self._shapes, base_names=self._base_names, allow_unsafe=self._allow_unsafe)
        return self._register(name, info, self._template(folder, None), "root")

    async def _ensure_loaded(self, adapter: Adapter) -> None:
        async with self._lock(adapter.name):
            await self._load_locked(adapter)

    async def _load_locked(self, adapter: Adapter) -> None:
        """Load ``adapter`` (its lock held); returns at once when it is loaded."""
        while adapter.state == "unloading":  # an eviction is finishing: wait for it, then load again
            await self._change.wait()
        if adapter.state == "refused":
            raise adapter.refusal()
        if adapter.state == "loaded" or self._adapters.get(adapter.name) is not adapter:
            return
        await self._reserve_slot()
        adapter.state = "loading"  # no await since the slot was counted: no one else can take it
        started = time.perf_counter()
        try:
            await self.backend.load_adapter(adapter.name, str(adapter.info.path))
        except BaseException:
            adapter.state = "on_disk"
            self._changed()
            raise
        adapter.state = "loaded"
        adapter.loads += 1
        self._changed()
        if self._metrics is not None:
            self._metrics.adapter_loaded(adapter.name, time.perf_counter() - started)
        self._report()
        log.info("loaded adapter %s from %s (%d resident)", adapter.name, adapter.info.path, self._resident())

    async def _reserve_slot(self) -> None:
        """Return when one more adapter may be resident, evicting the least recently used idle one if needed."""
        deadline = time.monotonic() + SLOT_WAIT_SECONDS
        while self.max_adapters is not None and self._resident() >= self.max_adapters:
            idle = [a for a in self._adapters.values() if a.state == "loaded" and not a.in_flight and not a.pinned]
            if idle:
                await self._evict(min(idle, key=lambda a: a.last_used or 0.0))
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Overloaded(f"all {self.max_adapters} adapter slots are busy with requests; try again shortly",
                                 retry_after=2.0)
            change = self._change
            try:
                await asyncio.wait_for(change.wait(), timeout=remaining)
            except asyncio.TimeoutError:
                continue

    async def _evict(self, adapter: Adapter) -> None:
        adapter.state = "unloading"  # set before any await: no lease can be taken on it from here on
        try:
            await self.backend.unload_adapter(adapter.name)
        except BaseException:
            adapter.state = "loaded"
            self._changed()
            raise
        adapter.state = "on_disk"
        self._changed()
        if self._metrics is not None:
            self._metrics.adapter_unloaded(adapter.name)
        self._report()
        log.info("unloaded adapter %s (%d resident)", adapter.name, self._resident())
