"""Shared fixtures for the whole test suite."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from gateway.demo import DemoModels


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> DemoModels:
    """The demo base model and adapters, built once per test session into a temporary folder (~10 s)."""
    from gateway.demo import build_demo  # imports torch: only for sessions that use the demo

    return build_demo(tmp_path_factory.mktemp("demo") / "zoo")
