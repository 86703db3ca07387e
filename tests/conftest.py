"""Shared fixtures for the whole test suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from unittest import mock

import pytest

if TYPE_CHECKING:
    from gateway.demo import DemoModels


@pytest.fixture(scope="session")
def demo_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ``XDG_CACHE_HOME`` of this test session's own, so ``gateway serve --demo`` finds the demo built here."""
    return tmp_path_factory.mktemp("cache-home")


@pytest.fixture(scope="session")
def demo_models(demo_cache_home: Path) -> DemoModels:
    """The demo base model and adapters, built once per test session where ``--demo`` looks for them (~10 s)."""
    from gateway.demo import build_demo, default_root  # imports torch: only for sessions that use the demo

    with mock.patch.dict(os.environ, {"XDG_CACHE_HOME": str(demo_cache_home)}):
        root = default_root()
    return build_demo(root)


@pytest.fixture(scope="session")
def demo_server(demo_models: DemoModels, demo_cache_home: Path) -> Iterator[str]:
    """A real ``gateway serve --demo`` on 127.0.0.1 for the whole session; yields its URL (no ``/v1``)."""
    from tests.servers import running_gateway

    with running_gateway(["--demo"], env={"XDG_CACHE_HOME": str(demo_cache_home)}) as url:
        yield url
