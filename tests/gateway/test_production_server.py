"""Run it in production, end to end: a real ``gateway serve --demo`` with keys, a rate limit, CORS and a body
limit; the metrics it serves after a known mix of requests, and the Grafana dashboard's queries against them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.test_metrics import value

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "lora-gateway.json"
ALICE = {"Authorization": "Bearer sk-alice"}
WHO = [{"role": "user", "content": "你是谁？"}]


@pytest.fixture(scope="module")
def server(demo_models, demo_cache_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    from tests.servers import running_gateway

    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("# one per line\nbob:sk-bob\n", encoding="utf-8")
    args = ["--demo", "--api-key", "alice:sk-alice", "--api-key", "carol:sk-carol", "--api-key-file", str(keys),
            "--admin-key", "adm", "--rate-limit-rpm", "6", "--cors-origin", "http://ui.example",
            "--max-body-bytes", "8192", "--route", "support-bot=pku-assistant:1,cat-assistant:1;sticky=user"]
    with running_gateway(args, env={"XDG_CACHE_HOME": str(demo_cache_home)}) as url:
        yield url


def scrape(server: str) -> str:
    response = httpx.get(f"{server}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return response.text


def test_keys_and_open_paths(server: str) -> None:
    assert httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny-qwen", "messages": WHO},
                      timeout=30).status_code == 401
    assert httpx.get(f"{server}/v1/models", headers=ALICE, timeout=10).status_code == 200
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
    assert httpx.get(f"{server}/ready", timeout=10).json()["status"] == "ready"


def test_metrics_change_with_a_known_mix(server: str) -> None:
    before = scrape(server)
    api = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-alice", max_retries=0)
    whole = api.chat.completions.create(model="pku-assistant", messages=WHO, temperature=0, max_tokens=8)
    chunks = list(api.chat.completions.create(model="pku-assistant", messages=WHO, temperature=0, max_tokens=8,
                                              stream=True, stream_options={"include_usage": True}))
    base = api.completions.create(model="tiny-qwen", prompt="你好", max_tokens=3, temperature=0)
    after = scrape(server)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    pku = {"model": "pku-assistant", "adapter": "pku-assistant", "backend": "torch", "model_name": "tiny-qwen"}
    assert grew("vllm:request_success_total", **pku) == 2
    assert grew("vllm:request_success_total", adapter="", model="tiny-qwen") == 1
    streamed = chunks[-1].usage
    assert whole.usage is not None and streamed is not None and base.usage is not None
    assert grew("vllm:generation_tokens_total", **pku) == whole.usage.completion_tokens + streamed.completion_tokens
    assert grew("vllm:prompt_tokens_total", **pku) == whole.usage.prompt_tokens + streamed.prompt_tokens
    assert grew("vllm:generation_tokens_total", adapter="") == base.usage.completion_tokens
    assert grew("vllm:time_to_first_token_seconds_count", **pku) == 2
    assert grew("gateway:key_requests_total", key="alice") == 3
    assert value(after, "vllm:num_requests_running") == 0 and value(after, "vllm:num_requests_waiting") == 0
    assert value(after, "gateway:adapters_resident") >= 1
    info = [s.labels for f in text_string_to_metric_families(after) for s in f.samples
            if s.name == "vllm:lora_requests_info"]
    assert info and set(info[0]) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}


def test_metrics_per_route_and_variant(server: str) -> None:
    """A route is the ``model`` label, the variant that served each request its ``variant`` and ``adapter``."""
    before = scrape(server)
    api = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-carol", max_retries=0)
    served = []
    for user in ("u1", "u2", "u3", "u4", "u5"):
        raw = api.chat.completions.with_raw_response.create(model="support-bot", messages=WHO, temperature=0,
                                                            max_tokens=4, user=user)
        served.append(raw.headers["x-gateway-variant"])
    after = scrape(server)
    assert set(served) <= {"pku-assistant", "cat-assistant"}
    for variant in ("pku-assistant", "cat-assistant"):
        labels = {"model": "support-bot", "variant": variant, "adapter": variant}
        grew = value(after, "vllm:request_success_total", **labels) - value(before, "vllm:request_success_total",
                                                                            **labels)
        assert grew == served.count(variant)
    assert value(after, "vllm:request_success_total", model="support-bot") - value(
        before, "vllm:request_success_total", model="support-bot") == 5


def test_rate_limit_is_429_with_retry_after(server: str) -> None:
    bob = {"Authorization": "Bearer sk-bob"}
    body = {"model": "tiny-qwen", "prompt": "你好", "max_tokens": 1}
    statuses = [httpx.post(f"{server}/v1/completions", json=body, headers=bob, timeout=30) for _ in range(7)]
    assert [r.status_code for r in statuses[:6]] == [200] * 6
    limited = statuses[6]
    assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert value(scrape(server), "gateway:rate_limited_total", key="bob") == 1


def test_body_over_the_limit_is_413(server: str) -> None:
    big = {"model": "tiny-qwen", "messages": [{"role": "user", "content": "x" * 10000}]}
    response = httpx.post(f"{server}/v1/chat/completions", json=big, headers=ALICE, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_cors_preflight(server: str) -> None:
    response = httpx.options(f"{server}/v1/chat/completions", headers={
        "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"}, timeout=10)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "http://ui.example"


def dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert len(exprs) >= 12
    return {m for e in exprs for m in re.findall(r"\b(?:vllm|gateway):[a-z0-9_]+", e)}


def exported(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        names.update(family.name + s for s in suffixes)
    return names


def test_dashboard_queries_only_exported_metrics(server: str) -> None:
    wanted = dashboard_metrics()
    assert {"vllm:time_to_first_token_seconds_bucket", "vllm:num_requests_waiting",
            "gateway:adapters_resident"} <= wanted
    missing = wanted - exported(scrape(server))
    assert not missing, f"the dashboard queries metrics the gateway does not export: {sorted(missing)}"


def test_a_client_hanging_up_mid_stream_counts_as_abort(server: str) -> None:
    import time

    before = scrape(server)
    body = {"model": "tiny-qwen", "prompt": "你好", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=ALICE, timeout=30) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the stream is running; now hang up
    deadline = time.monotonic() + 20
    while True:
        after = scrape(server)
        aborted = value(after, "vllm:request_success_total", finished_reason="abort") - value(
            before, "vllm:request_success_total", finished_reason="abort")
        if aborted == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert aborted == 1
    assert value(after, "vllm:num_requests_running") == 0
    generated = value(after, "vllm:generation_tokens_total", adapter="") - value(
        before, "vllm:generation_tokens_total", adapter="")
    assert 0 < generated < 3000  # what was produced before the hang-up, not the budget
