"""Shared fixtures for the whole test suite."""

from __future__ import annotations

import pytest

from gateway.demo import DemoModels, build_demo


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> DemoModels:
    """The demo base model and adapters, built once per test session into a temporary folder (~10 s)."""
    return build_demo(tmp_path_factory.mktemp("demo") / "zoo")
