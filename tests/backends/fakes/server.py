"""Serve an ASGI app with a real uvicorn on 127.0.0.1 in a background thread (its own event loop)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """A uvicorn server that can be started, killed mid-flight (connections dropped) and restarted on its port."""

    def __init__(self, app: Any, port: int | None = None, *, lifespan: str = "off") -> None:
        self.app = app
        self.lifespan = lifespan
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ServerThread:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan=self.lifespan)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise RuntimeError(f"fake upstream did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop at once: open connections are dropped, like a crashed upstream."""
        if self._server is None or self._thread is None:
            return
        self._server.force_exit = True
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._server = self._thread = None


@contextmanager
def serve(app: Any) -> Iterator[ServerThread]:
    server = ServerThread(app).start()
    try:
        yield server
    finally:
        server.stop()
