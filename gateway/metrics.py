"""Prometheus metrics: vLLM's names, meanings and bucket boundaries, labelled per adapter.

Names: every figure vLLM also exposes keeps vLLM's ``vllm:`` name (so dashboards and LoRA-aware routers written
for vLLM — the Kubernetes Gateway API Inference Extension reads ``vllm:num_requests_waiting`` and
``vllm:lora_requests_info`` — work on the gateway unchanged); figures only the gateway has are ``gateway:``.
Where vLLM counts every LoRA under its base, the gateway labels every request series by

    model_name  the base model's served name (vLLM's label, constant per gateway)
    model       what the request named: the base, an adapter, or a route
    adapter     the LoRA that served it ("" for the base)
    variant     the A/B variant a route chose ("" without a route)
    backend     torch, vllm, lmdeploy, ollama or openai

Meanings, where the gateway's view differs from an engine's:

- ``num_requests_waiting``: accepted, no output yet (waiting for an adapter slot, in the engine queue, or in
  prefill); ``num_requests_running``: streaming output.
- ``request_queue_time_seconds``: arrival until the backend took the request (adapter load included), plus the
  native engine's wait for a batch slot.
- ``inter_token_latency_seconds``: the gap between consecutive output pieces (a token on the native engine and on
  vLLM, one SSE chunk on other upstreams). Gaps are collected per request (a float per token) and observed when
  the request ends, so the per-token work stays at an append.
- ``vllm:lora_requests_info``: vLLM's gauge, value = the time of the update, labels ``running_lora_adapters`` and
  ``waiting_lora_adapters`` (comma-separated names with rows running / waiting: the native engine's own rows, the
  gateway's requests for upstreams) and ``max_lora`` (``--max-adapters``, or the adapters known when unbounded).
  Refreshed on every request start and end and on every scrape.

Several worker processes: set ``PROMETHEUS_MULTIPROC_DIR`` (an empty folder) before the processes start and every
figure is the sum over them (request gauges ``livesum``; residency and ``lora_requests_info`` ``livemax``, since
workers in front of one upstream see the same adapters). ``render`` then reads every process's files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.request_context import RequestContext

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LABELS = ("model_name", "model", "adapter", "variant", "backend")

# vLLM's boundaries (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                         20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
ADAPTER_LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's token-count buckets)."""
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(buckets)
            buckets.append(value)
        exponent += 1


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


AdapterRows = Callable[[], "tuple[dict[str, int], dict[str, int]] | None"]
"""(running, waiting) requests per adapter name from the engine itself, or ``None`` when it cannot tell."""


class _Series:
    """The request metrics' children for one label tuple."""

    def __init__(self, labels: tuple[str, ...], metrics: Metrics) -> None:
        self.labels = labels
        self.waiting = metrics.waiting.labels(*labels)
        self.running = metrics.running.labels(*labels)
        self.ttft = metrics.ttft.labels(*labels)
        self.itl = metrics.itl.labels(*labels)
        self.e2e = metrics.e2e.labels(*labels)
        self.queue = metrics.queue.labels(*labels)
        self.prompt_tokens = metrics.prompt_tokens.labels(*labels)
        self.generation_tokens = metrics.generation_tokens.labels(*labels)
        self.request_prompt = metrics.request_prompt.labels(*labels)
        self.request_generation = metrics.request_generation.labels(*labels)
        self.max_tokens = metrics.max_tokens.labels(*labels)
        self._success_family = metrics.success
        self._success: dict[str, Counter] = {}

    def success(self, reason: str) -> Counter:
        child = self._success.get(reason)
        if child is None:
            child = self._success[reason] = self._success_family.labels(*self.labels, reason)
        return child


class Metrics:
    """The gateway's collectors, on a registry of its own (one per app: no module-level state)."""

    def __init__(self, *, model_name: str, backend: str, max_model_len: int) -> None:
        self.model_name = model_name
        self.backend = backend
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.running = Gauge("vllm:num_requests_running", "Requests streaming output.", LABELS, registry=r,
                             multiprocess_mode="livesum")
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests accepted with no output yet.", LABELS,
                             registry=r, multiprocess_mode="livesum")
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              LABELS, registry=r, buckets=TTFT_BUCKETS)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             LABELS, registry=r, buckets=TOKEN_LATENCY_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             LABELS, registry=r, buckets=REQUEST_LATENCY_BUCKETS)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Histogram of time spent waiting before the "
                               "backend took the request.", LABELS, registry=r, buckets=REQUEST_LATENCY_BUCKETS)
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", LABELS, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", LABELS,
                                         registry=r)
        self.request_prompt = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", LABELS,
                                        registry=r, buckets=token_buckets)
        self.request_generation = Histogram("vllm:request_generation_tokens", "Number of generation tokens "
                                            "processed.", LABELS, registry=r, buckets=token_buckets)
        self.max_tokens = Histogram("vllm:request_params_max_tokens", "Histogram of the max_tokens request "
                                    "parameter.", LABELS, registry=r, buckets=token_buckets)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               (*LABELS, "finished_reason"), registry=r)
        self.errors = Counter("gateway:request_errors", "Requests that failed, by OpenAI error type and status.",
                              (*LABELS, "error_type", "status"), registry=r)
        self.lora_info = Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
                               ("max_lora", "waiting_lora_adapters", "running_lora_adapters"), registry=r,
                               multiprocess_mode="livemax")
        self.resident = Gauge("gateway:adapters_resident", "Adapters loaded in the backend.", registry=r,
                              multiprocess_mode="livemax")
        self.on_disk = Gauge("gateway:adapters_on_disk", "Adapters known and not loaded.", registry=r,
                             multiprocess_mode="livemax")
        self.loads = Counter("gateway:adapter_loads", "Adapter loads into the backend.", ("adapter",), registry=r)
        self.evictions = Counter("gateway:adapter_evictions", "Adapters unloaded from the backend (evicted or "
                                 "unloaded through the admin API).", ("adapter",), registry=r)
        self.load_time = Histogram("gateway:adapter_load_seconds", "Time to load an adapter into the backend.",
                                   ("adapter",), registry=r, buckets=ADAPTER_LOAD_BUCKETS)
        self.key_requests = Counter("gateway:key_requests", "Generation requests per API key name.", ("key",),
                                    registry=r)
        self.key_tokens = Counter("gateway:key_tokens", "Prompt plus completion tokens per API key name.", ("key",),
                                  registry=r)
        self.rate_limited = Counter("gateway:rate_limited", "Requests refused by a per-key limit.", ("key", "limit"),
                                    registry=r)
        self._adapter_rows: AdapterRows = lambda: None
        self._max_lora: Callable[[], int] = lambda: 0
        self._requests: dict[str, list[int]] = {}  # adapter -> [waiting, running] gateway requests (this process)
        self._lora_labels: tuple[str, str, str] | None = None
        self._by_labels: dict[tuple[str, ...], _Series] = {}

    # --- sources ----------------------------------------------------------------------------------------------

    def watch(self, *, adapter_rows: AdapterRows | None = None, max_lora: Callable[[], int] | None = None) -> None:
        """Where ``lora_requests_info`` reads the engine's rows per adapter and the adapter limit."""
        if adapter_rows is not None:
            self._adapter_rows = adapter_rows
        if max_lora is not None:
            self._max_lora = max_lora

    def _labels(self, ctx: RequestContext) -> tuple[str, ...]:
        return (self.model_name, ctx.model or "", ctx.adapter or "", ctx.variant or "", ctx.backend or self.backend)

    # --- request lifecycle (called by gateway.access and the generation observer) ------------------------------

    def _series(self, ctx: RequestContext) -> _Series:
        """The labelled children of one (model, adapter, variant, backend), looked up once and kept: resolving a
        child costs a lock and a validation per call, which per request added up to ~0.2 ms."""
        labels = self._labels(ctx)
        series = self._by_labels.get(labels)
        if series is None:
            series = self._by_labels[labels] = _Series(labels, self)
        return series

    def request_started(self, ctx: RequestContext) -> None:
        """A generation request was handed to the backend: it waits until its first output."""
        self._series(ctx).waiting.inc()
        self._count(ctx.adapter, 0, +1)

    def first_output(self, ctx: RequestContext) -> None:
        series = self._series(ctx)
        series.waiting.dec()
        series.running.inc()
        self._count(ctx.adapter, 0, -1)
        self._count(ctx.adapter, 1, +1)

    def request_ended(self, ctx: RequestContext) -> None:
        """Record a finished request (the access observer calls this once the response is over)."""
        series = self._series(ctx)
        if ctx.submitted is not None:  # it reached the backend: leave waiting/running
            if ctx.first_token is None:
                series.waiting.dec()
                self._count(ctx.adapter, 0, -1)
            else:
                series.running.dec()
                self._count(ctx.adapter, 1, -1)
        if ctx.key_name is not None and ctx.generation:
            self.key_requests.labels(ctx.key_name).inc()
            self.key_tokens.labels(ctx.key_name).inc(ctx.prompt_tokens + ctx.completion_tokens)
        if ctx.error_type is not None:
            self.errors.labels(*series.labels, ctx.error_type, str(ctx.status or 0)).inc()
        if ctx.submitted is not None:
            self._record_generation(ctx, series)
        self.refresh_lora_info()

    def _record_generation(self, ctx: RequestContext, series: _Series) -> None:
        if ctx.prompt_tokens:
            series.prompt_tokens.inc(ctx.prompt_tokens)
            series.request_prompt.observe(ctx.prompt_tokens)
        series.generation_tokens.inc(ctx.completion_tokens)
        series.request_generation.observe(ctx.completion_tokens)
        if ctx.max_tokens is not None:
            series.max_tokens.observe(ctx.max_tokens)
        queue = ctx.queue_seconds
        if queue is not None:
            series.queue.observe(queue)
        if ctx.ttft is not None:
            series.ttft.observe(ctx.ttft)
        for gap in ctx.token_gaps:
            series.itl.observe(gap)
        if ctx.total is not None:
            series.e2e.observe(ctx.total)
        reasons = ctx.finish_reasons
        if not reasons and (ctx.client_disconnected or ctx.error_type is not None):
            reasons = ["abort"]  # vLLM's reason for a request that did not run to its end
        for reason in reasons:
            series.success(reason).inc()

    def _count(self, adapter: str | None, column: int, delta: int) -> None:
        if adapter is None:
            return
        counts = self._requests.setdefault(adapter, [0, 0])
        counts[column] += delta
        if counts == [0, 0]:
            del self._requests[adapter]

    # --- adapters (called by gateway.adapters.AdapterPool) -----------------------------------------------------

    def adapter_loaded(self, name: str, seconds: float) -> None:
        self.loads.labels(name).inc()
        self.load_time.labels(name).observe(seconds)

    def adapter_unloaded(self, name: str) -> None:
        self.evictions.labels(name).inc()

    def residency(self, resident: int, on_disk: int | None = None) -> None:
        self.resident.set(resident)
        if on_disk is not None:
            self.on_disk.set(on_disk)

    def limited(self, key: str, limit: str) -> None:
        self.rate_limited.labels(key, limit).inc()

    # --- lora_requests_info and rendering ----------------------------------------------------------------------

    def lora_adapters(self) -> tuple[list[str], list[str]]:
        """(running, waiting) adapter names: the engine's rows when it reports them, else the gateway's requests."""
        rows = self._adapter_rows()
        if rows is not None:
            running, waiting = rows
            return sorted(a for a, n in running.items() if n), sorted(a for a, n in waiting.items() if n)
        return (sorted(a for a, (_, n) in self._requests.items() if n),
                sorted(a for a, (n, _) in self._requests.items() if n))

    def refresh_lora_info(self) -> None:
        running, waiting = self.lora_adapters()
        labels = (str(self._max_lora()), ",".join(waiting), ",".join(running))
        if self._lora_labels is not None and self._lora_labels != labels and multiprocess_dir() is None:
            self.lora_info.remove(*self._lora_labels)  # one current series, as a router reads it
        self._lora_labels = labels
        self.lora_info.labels(*labels).set(time.time())

    def render(self) -> bytes:
        """The exposition text: this registry, or every process's figures in multiprocess mode."""
        self.refresh_lora_info()
        folder = multiprocess_dir()
        if folder is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=folder)
        return generate_latest(registry)

