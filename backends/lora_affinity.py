"""Which LoRA adapters each upstream replica has active, and how suitable a replica is for an adapter.

The scores are those of the Kubernetes Gateway API Inference Extension's lora-affinity scorer, which reads vLLM's
``vllm:lora_requests_info`` gauge (labels ``running_lora_adapters`` and ``waiting_lora_adapters``, comma-separated
names, and ``max_lora``, the adapters one batch can hold; the sample with the highest value, a timestamp, is the
current one): 1.0 when the adapter is active on the replica, 0.8 when the replica has room to activate one more,
0.6 when the adapter is waiting to be activated there, 0 otherwise. The pool ranks replicas by this score, then by
fewest requests in flight.

Between two scrapes the gateway also knows what it sent: adapters of its own requests in flight count as active,
and so do the last ``max_lora`` adapters it sent to the replica (vLLM keeps its active LoRA slots as an LRU, so
those are the ones still resident when nothing else uses the replica).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

LORA_INFO_METRIC = "vllm:lora_requests_info"


@dataclass(frozen=True)
class LoraRequestsInfo:
    running: frozenset[str]
    waiting: frozenset[str]
    max_lora: int | None


def parse_lora_requests_info(metrics_text: str) -> LoraRequestsInfo | None:
    """The current ``vllm:lora_requests_info`` sample of a Prometheus text exposition, ``None`` if absent."""
    latest = None
    try:
        for family in text_string_to_metric_families(metrics_text):
            if family.name != LORA_INFO_METRIC:
                continue
            for sample in family.samples:
                if latest is None or sample.value >= latest.value:
                    latest = sample
    except ValueError:
        return None  # not a Prometheus exposition: the replica tells us nothing
    if latest is None:
        return None

    def names(label: str) -> frozenset[str]:
        return frozenset(n for n in latest.labels.get(label, "").split(",") if n)

    max_lora = latest.labels.get("max_lora", "")
    return LoraRequestsInfo(names("running_lora_adapters"), names("waiting_lora_adapters"),
                            int(max_lora) if max_lora.isdigit() else None)


@dataclass
class LoraResidency:
    """What one replica has active, from its last scrape and from the requests this gateway sent it."""

    reported: LoraRequestsInfo = field(default_factory=lambda: LoraRequestsInfo(frozenset(), frozenset(), None))
    in_flight: Counter[str] = field(default_factory=Counter)
    recent: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def begin(self, adapter: str) -> None:
        self.in_flight[adapter] += 1
        self.recent.pop(adapter, None)
        self.recent[adapter] = None
        limit = self.reported.max_lora or 1
        while len(self.recent) > limit:
            self.recent.popitem(last=False)

    def end(self, adapter: str) -> None:
        self.in_flight[adapter] -= 1
        if self.in_flight[adapter] <= 0:
            del self.in_flight[adapter]

    def forget(self) -> None:
        """The replica restarted or went away: nothing is known to be active there any more."""
        self.reported = LoraRequestsInfo(frozenset(), frozenset(), self.reported.max_lora)
        self.recent.clear()

    def active(self) -> set[str]:
        return set(self.reported.running) | set(self.in_flight) | set(self.recent)

    def score(self, adapter: str) -> float:
        """The lora-affinity score of this replica for ``adapter`` (see the module docstring)."""
        active = self.active()
        if adapter in active:
            return 1.0
        max_lora = self.reported.max_lora
        if max_lora is None or len(active | self.reported.waiting) < max_lora:
            return 0.8
        if adapter in self.reported.waiting:
            return 0.6
        return 0.0
