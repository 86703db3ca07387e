"""Running the server, draining on SIGTERM, and ``--workers N``.

The drain (one worker process, the default):

1. The first SIGTERM (or SIGINT) marks the app's ``Lifecycle`` as draining, so ``/ready`` answers 503 to anything
   still connected, and uvicorn closes its listening socket: new connections are refused, which every proxy and
   Kubernetes Service retries on another endpoint (a refused connect is always safe to retry). Idle keep-alive
   connections are closed; a connection with a response in progress gets ``Connection: close`` after it.
2. Requests in flight, streams included, run to their end for up to ``drain_timeout`` seconds
   (uvicorn's ``timeout_graceful_shutdown``); whatever still runs then is cancelled.
3. The app's lifespan shutdown closes the backend; the process exits 0.

A second SIGTERM during the drain stops at once: uvicorn's ``force_exit`` (open streams are cut, the lifespan
shutdown is skipped). Kubernetes sends SIGTERM after the pod's ``preStop`` hook, which sleeps a few seconds so the
endpoint is gone from every Service before the listener closes (deploy/kubernetes).

With ``--workers N`` (upstream backends only) uvicorn's process supervisor runs N copies of the app built by
``gateway.app:create_app_from_env`` from settings the parent hands over in ``SETTINGS_ENV``. On SIGTERM the
supervisor forwards the signal and each worker lets its requests in flight finish within ``drain_timeout``, but
uvicorn's own worker servers do not flip ``/ready``, the supervisor keeps the shared listening socket open until
they exit (new connections wait in its backlog instead of being refused) and a second SIGTERM does not cut the
drain short. Hence one worker per pod on Kubernetes, where the pod count scales instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

import uvicorn

from gateway.settings import Settings

log = logging.getLogger(__name__)

SETTINGS_ENV = "LORA_GATEWAY_WORKER_SETTINGS"
"""The environment variable through which ``gateway serve --workers N`` hands its settings (JSON) to workers."""

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus-client's multiprocess mode: each worker writes its figures here, ``/metrics`` sums them."""


@dataclass
class Lifecycle:
    """Where the server process stands; ``/ready`` consults it. Lives on ``app.state.lifecycle``."""

    draining: bool = False

    def begin_drain(self) -> None:
        if not self.draining:
            log.info("draining: refusing new connections, letting requests in flight finish")
        self.draining = True


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain described in the module docstring.

    Differs from ``uvicorn.Server`` in two ways: the first signal also marks ``lifecycle`` as draining and a second
    SIGTERM (not only a second SIGINT) forces the exit; and a drained signal is not raised again once the server
    stopped (uvicorn re-raises it so an embedding program sees it, which would end this process with SIGTERM's
    status instead of 0: here the drain *is* the handling of the signal).
    """

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            log.warning("second %s: stopping now, requests in flight are cut", signal.Signals(sig).name)
            self.force_exit = True
        else:
            self.lifecycle.begin_drain()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()


def fresh_multiproc_dir() -> str:
    """A new empty folder for prometheus-client's multiprocess files; a stale one would add old counts."""
    stale = os.environ.get(MULTIPROC_ENV)
    if stale and os.path.isdir(stale) and os.path.basename(stale).startswith("lora-gateway-metrics-"):
        shutil.rmtree(stale, ignore_errors=True)
    return tempfile.mkdtemp(prefix="lora-gateway-metrics-")


def run_server(settings: Settings, *, log_level: str = "info", access_log: bool = True) -> None:
    """Serve until stopped: one process with the drain, or ``settings.workers`` processes under uvicorn."""
    if settings.workers == 1:
        from gateway.app import create_app

        lifecycle = Lifecycle()
        config = uvicorn.Config(create_app(settings, lifecycle=lifecycle), host=settings.host, port=settings.port,
                                log_level=log_level, access_log=access_log,
                                timeout_graceful_shutdown=settings.drain_timeout)
        DrainingServer(config, lifecycle).run()
        return
    metrics_dir = fresh_multiproc_dir()
    os.environ[MULTIPROC_ENV] = metrics_dir
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    try:
        uvicorn.run("gateway.app:create_app_from_env", factory=True, host=settings.host, port=settings.port,
                    workers=settings.workers, log_level=log_level, access_log=access_log,
                    timeout_graceful_shutdown=settings.drain_timeout)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
