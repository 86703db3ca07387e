"""Start a real ``gateway serve`` (uvicorn) process on 127.0.0.1 for end-to-end tests, and always stop it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class GatewayProcess:
    url: str  # no ``/v1``
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def gateway_process(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120.0,
                    ready_path: str = "/ready") -> Iterator[GatewayProcess]:
    """Run ``python -m gateway.cli serve ARGS`` until the block ends (the process is stopped if still running);
    yields once ``ready_path`` answers 200."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="gateway-", suffix=".log", delete=False)  # noqa: SIM115
    data_home = tempfile.TemporaryDirectory(prefix="gateway-data-")  # the feedback store, unless env says where
    command = [sys.executable, "-m", "gateway.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "XDG_DATA_HOME": data_home.name, **(env or {})},
                               cwd=Path(__file__).parents[1])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"gateway exited with {process.returncode}:\n{Path(log.name).read_text()}")
            try:
                if httpx.get(f"{url}{ready_path}", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start in {timeout} s:\n{Path(log.name).read_text()}")
            time.sleep(0.2)
        yield GatewayProcess(url, process, Path(log.name))
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
        os.unlink(log.name)
        data_home.cleanup()


@contextmanager
def running_gateway(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120.0) -> Iterator[str]:
    """Run ``python -m gateway.cli serve ARGS`` until the block ends; yields the base URL (no ``/v1``)."""
    with gateway_process(args, env=env, timeout=timeout) as gateway:
        yield gateway.url
