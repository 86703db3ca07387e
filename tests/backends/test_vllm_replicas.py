"""vLLM replicas behind one VLLMBackend: adapters on every replica, restarts, dead replicas, LoRA affinity.

The replicas are fake vLLM servers (tests/backends/fakes/vllm.py) on real local ports; a restart is a fresh fake
on the same port, so everything loaded at runtime is gone, as with a real vLLM.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backends.upstream_pool import Timeouts, UpstreamPool
from backends.vllm import VLLMBackend
from gateway.errors import AdapterLoadError
from tests.backends.fakes.server import ServerThread
from tests.backends.fakes.vllm import FakeVLLM
from tests.backends.support import collect, gen_request, text_of

DISK = frozenset({"/saves/a", "/saves/b", "/saves/c"})
MANUAL = Timeouts(connect=0.5, first_byte=2, idle=2, health=0.5, health_interval=0)  # health rounds by hand


class Replicas:
    def __init__(self, count: int, **fake: object) -> None:
        self.options = fake
        self.fakes = [FakeVLLM(disk=DISK, **fake) for _ in range(count)]  # type: ignore[arg-type]
        self.servers = [ServerThread(f.app()).start() for f in self.fakes]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def stop(self, i: int) -> None:
        self.servers[i].stop()

    def start(self, i: int) -> None:
        """(Re)start replica ``i`` on its port as a fresh vLLM: it knows only its base model."""
        self.fakes[i] = FakeVLLM(disk=DISK, **self.options)  # type: ignore[arg-type]
        self.servers[i] = ServerThread(self.fakes[i].app(), port=self.servers[i].port).start()

    def restart(self, i: int) -> None:
        self.stop(i)
        self.start(i)

    def loads(self, i: int) -> list[str]:
        return [b["lora_name"] for b in self.fakes[i].recorder.bodies("/v1/load_lora_adapter")]

    def completions(self, i: int) -> list[str]:
        return [b["model"] for b in self.fakes[i].recorder.bodies("/v1/completions")]

    def close(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def replicas(request: pytest.FixtureRequest) -> Iterator[Replicas]:
    options = getattr(request, "param", {})
    group = Replicas(options.pop("count", 2), **options)
    yield group
    group.close()


def backend(urls: list[str], *, affinity: bool = True) -> VLLMBackend:
    pool = UpstreamPool(urls, timeouts=MANUAL)
    pool.lora_affinity = affinity
    return VLLMBackend(pool, base_model="tiny")


async def test_an_adapter_is_loaded_on_every_replica(replicas: Replicas) -> None:
    b = backend(replicas.urls)
    await b.start()
    await b.load_adapter("a", "/saves/a")
    assert replicas.loads(0) == replicas.loads(1) == ["a"]
    await b.aclose()


async def test_restarted_replica_gets_its_adapters_back_at_the_next_health_round(replicas: Replicas) -> None:
    b = backend(replicas.urls)
    await b.start()
    await b.load_adapter("a", "/saves/a")
    await b.load_adapter("b", "/saves/b")
    replicas.restart(1)
    assert replicas.fakes[1].loras == {}
    await b.pool.check_health()
    assert replicas.fakes[1].loras == {"a": "/saves/a", "b": "/saves/b"}
    assert replicas.loads(0) == ["a", "b"], "the healthy replica is left alone"
    await b.aclose()


async def test_a_404_for_a_forgotten_lora_is_retried_once_after_re_registering(replicas: Replicas) -> None:
    b = backend(replicas.urls[:1])
    await b.start()
    await b.load_adapter("a", "/saves/a")
    replicas.restart(0)  # between two health rounds: the gateway has not noticed
    deltas = await collect(b.generate(gen_request("a")))
    assert text_of(deltas) == " t0 t1 t2 t3"
    assert replicas.completions(0) == ["a", "a"], "first answered 404, then served"
    assert replicas.loads(0) == ["a"]
    await b.aclose()


async def test_a_dead_replica_never_fails_an_admin_load_and_gets_the_adapter_when_back(replicas: Replicas) -> None:
    b = backend(replicas.urls)
    await b.start()
    replicas.stop(1)
    await b.load_adapter("a", "/saves/a")  # no error: replica 0 has it
    assert replicas.loads(0) == ["a"]
    await collect(b.generate(gen_request("a")))
    replicas.start(1)
    await b.pool.check_health()
    assert replicas.fakes[1].loras == {"a": "/saves/a"}
    await b.aclose()


async def test_a_replica_that_comes_back_gets_the_adapter_before_its_first_request_for_it(replicas: Replicas) -> None:
    b = backend(replicas.urls)
    await b.start()
    await b.load_adapter("a", "/saves/a")
    replicas.restart(0)
    replicas.stop(1)
    await b.pool.check_health()  # replica 1 is down now; replica 0 was re-synced
    assert replicas.fakes[0].loras == {"a": "/saves/a"}
    replicas.start(1)  # back, but no health round yet: the request to it must register first
    b.pool.replicas[0].healthy = False  # make replica 1 the only choice
    b.pool.replicas[1].healthy = True
    await collect(b.generate(gen_request("a")))
    assert replicas.completions(1) == ["a"], "no 404 first: registered before the request"
    await b.aclose()


async def test_load_fails_only_when_no_replica_takes_the_adapter(replicas: Replicas) -> None:
    b = backend(replicas.urls)
    await b.start()
    with pytest.raises(AdapterLoadError, match="No adapter found"):
        await b.load_adapter("x", "/saves/x")
    await b.aclose()


@pytest.mark.parametrize("replicas", [{"count": 3, "max_loras": 1}], indirect=True)
async def test_affinity_sends_an_adapter_where_it_is_active(replicas: Replicas) -> None:
    with_affinity = backend(replicas.urls)
    await with_affinity.start()
    for name in "abc":
        await with_affinity.load_adapter(name, f"/saves/{name}")
    await with_affinity.pool.check_health()  # scrape: max_lora=1 on each
    assert [r.lora.reported.max_lora for r in with_affinity.pool.replicas] == [1, 1, 1]
    for _ in range(4):
        for name in "abc":
            await collect(with_affinity.generate(gen_request(name)))
    assert sum(f.misses for f in replicas.fakes) == 3, "each adapter activated once, on a replica of its own"
    assert sorted(len(set(replicas.completions(i))) for i in range(3)) == [1, 1, 1]
    await with_affinity.aclose()


@pytest.mark.parametrize("replicas", [{"count": 3, "max_loras": 1}], indirect=True)
async def test_fewest_in_flight_alone_swaps_adapters_on_every_request(replicas: Replicas) -> None:
    baseline = backend(replicas.urls, affinity=False)
    await baseline.start()
    for name in "abc":
        await baseline.load_adapter(name, f"/saves/{name}")
    for _ in range(4):
        for name in "abc":
            await collect(baseline.generate(gen_request(name)))
    assert sum(f.misses for f in replicas.fakes) == 12
    await baseline.aclose()
