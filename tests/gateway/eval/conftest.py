"""One ``gateway eval`` run of the identity set through the demo, in-process, shared by the tests that read it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from gateway.demo import DemoModels

DATA = Path(__file__).parents[1] / "data" / "eval"
MODELS = "tiny-qwen,pku-assistant"


@dataclass(frozen=True)
class EvalRun:
    out: Path
    stdout: str
    stderr: str


def run_eval(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m gateway.cli eval ARGS`` from the worktree, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "gateway.cli", "eval", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, cwd=Path(__file__).parents[3])


def identity_args(out: Path) -> list[str]:
    # 64 tokens: the base's off-topic answers run to the context length otherwise, which only costs time here.
    return ["--dataset", "identity", "--dataset-dir", str(DATA), "--models", MODELS, "--max-tokens", "64",
            "--out", str(out)]


@pytest.fixture(scope="session")
def identity_eval(demo_models: DemoModels, demo_cache_home: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> EvalRun:
    """``gateway eval --demo`` (the gateway in the eval's own process) on the 20-example identity set."""
    out = tmp_path_factory.mktemp("eval-in-process")
    result = run_eval([*identity_args(out), "--demo"], env={"XDG_CACHE_HOME": str(demo_cache_home)})
    assert result.returncode == 0, result.stderr
    return EvalRun(out=out, stdout=result.stdout, stderr=result.stderr)


@pytest.fixture
def chromium() -> Iterator[Any]:
    """Debian's chromium driven by Playwright, headless (no browser can be downloaded here).

    Per test, not per session: Playwright's sync API keeps an event loop running in the main thread while it is
    open, and every later ``asyncio.run`` (and async test) would fail with "cannot be called from a running event
    loop"."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"])
        try:
            yield browser
        finally:
            browser.close()
