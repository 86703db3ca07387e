"""SIGTERM drain through a real ``gateway serve`` process: streams in flight finish, new connections are refused,
the process exits 0; a second SIGTERM, or the end of ``--drain-timeout``, cuts what still runs."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from gateway.demo import DemoModels
from gateway.lifecycle import Lifecycle
from tests.servers import GatewayProcess, gateway_process


class Stream:
    """A streamed completion read in a background thread, line by line."""

    def __init__(self, url: str, max_tokens: int) -> None:
        self.lines: list[str] = []
        self.error: BaseException | None = None
        body = {"model": "tiny-qwen", "prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        self._thread = threading.Thread(target=self._read, args=(url, body), daemon=True)
        self._thread.start()

    def _read(self, url: str, body: dict[str, object]) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line:
                        self.lines.append(line)
        except httpx.HTTPError as exc:
            self.error = exc

    def wait_started(self, chunks: int = 2) -> None:
        deadline = time.monotonic() + 60
        while len(self.lines) < chunks:
            assert time.monotonic() < deadline and self._thread.is_alive(), (self.lines, self.error)
            time.sleep(0.02)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not end"

    def usage(self) -> dict[str, int] | None:
        for line in self.lines:
            if line.startswith("data: {") and '"usage"' in line:
                return json.loads(line[6:])["usage"]  # type: ignore[no-any-return]
        return None


def exit_status(gateway: GatewayProcess, within: float) -> int:
    try:
        return gateway.process.wait(timeout=within)
    except Exception:
        raise AssertionError(f"the gateway did not exit within {within} s:\n{gateway.log()[-3000:]}") from None


def refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=2)
    except httpx.ConnectError:
        return True
    return False


@pytest.fixture
def demo_env(demo_models: DemoModels, demo_cache_home: Path) -> dict[str, str]:
    return {"XDG_CACHE_HOME": str(demo_cache_home)}


def test_sigterm_lets_streams_in_flight_finish_then_exits_0(demo_env: dict[str, str]) -> None:
    with gateway_process(["--demo", "--drain-timeout", "60"], env=demo_env) as gateway:
        streams = [Stream(gateway.url, max_tokens=80) for _ in range(2)]
        for stream in streams:
            stream.wait_started()
        gateway.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert refused(gateway.url), "a new connection was accepted while draining"
        for stream in streams:
            stream.join(timeout=90)
            assert stream.error is None
            assert stream.lines[-1] == "data: [DONE]"
            usage = stream.usage()
            assert usage is not None and usage["completion_tokens"] == 80, "the whole answer, not a part"
        assert exit_status(gateway, within=30) == 0
        assert "draining" in gateway.log()


def test_second_sigterm_stops_at_once(demo_env: dict[str, str]) -> None:
    with gateway_process(["--demo", "--drain-timeout", "120"], env=demo_env) as gateway:
        stream = Stream(gateway.url, max_tokens=1900)  # minutes of generation on this CPU
        stream.wait_started()
        gateway.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert gateway.process.poll() is None, "the first SIGTERM should drain, not stop"
        started = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        exit_status(gateway, within=10)
        assert time.monotonic() - started < 10
        stream.join(timeout=10)
        assert "data: [DONE]" not in stream.lines  # the stream was cut, not finished


def test_drain_timeout_cuts_streams_still_running_and_exits_0(demo_env: dict[str, str]) -> None:
    with gateway_process(["--demo", "--drain-timeout", "1"], env=demo_env) as gateway:
        stream = Stream(gateway.url, max_tokens=1900)
        stream.wait_started()
        started = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        assert exit_status(gateway, within=20) == 0
        assert 0.9 < time.monotonic() - started < 20
        stream.join(timeout=10)
        assert stream.usage() is None  # cut before its end


def test_ready_answers_503_once_draining(demo_models: DemoModels) -> None:
    from gateway.app import create_app
    from gateway.settings import Settings
    from tests.backends.fakes import openai as openai_fake
    from tests.backends.fakes.recording import Recorder
    from tests.backends.fakes.server import ServerThread, serve

    with serve(openai_fake.create_app({"base": "hi"}, Recorder())) as upstream:
        settings = Settings(model=str(demo_models.base_dir), template="qwen", backend="openai",
                            upstream=(upstream.url,), upstream_model="base", upstream_health_interval=0)
        lifecycle = Lifecycle()
        server = ServerThread(create_app(settings, lifecycle=lifecycle), lifespan="on").start()
        try:
            assert httpx.get(f"{server.url}/ready").status_code == 200
            lifecycle.begin_drain()
            answer = httpx.get(f"{server.url}/ready")
            assert answer.status_code == 503 and answer.json()["status"] == "draining"
            assert httpx.get(f"{server.url}/health").status_code == 200  # alive: a liveness probe must not kill it
        finally:
            server.stop()
