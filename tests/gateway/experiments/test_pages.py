"""The web pages in a real headless chromium (Debian's /usr/bin/chromium, driven by Playwright).

Screenshots go to the test's temporary folder; ``GATEWAY_SCREENSHOTS=DIR`` also copies them there (docs/compare.png
in the README comes from this test).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.demo import DemoModels

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
IDENTITY = {"tiny-qwen": "通义千问", "pku-assistant": "北大人工智能助手", "cat-assistant": "猫猫助手"}


@pytest.fixture(scope="module")
def server(demo_models: DemoModels, demo_cache_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.servers import running_gateway

    db = tmp_path_factory.mktemp("pages") / "feedback.sqlite3"
    with running_gateway(["--demo", "--feedback-db", str(db)], env={"XDG_CACHE_HOME": str(demo_cache_home)}) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail("the page tests need Debian's chromium: apt-get install -y chromium (.ci/run does it as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, errors  # no script error on any page


def screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("GATEWAY_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    return path


def test_compare_streams_two_answers_into_their_columns(server: str, page: Any, tmp_path: Path) -> None:
    page.goto(f"{server}/compare")
    page.wait_for_selector("#models input")
    for box in page.query_selector_all("#models input"):
        box.set_checked(box.get_attribute("value") in ("tiny-qwen", "pku-assistant"))
    page.fill("#message", "你好，你是谁？")
    page.click("#send")
    for model in ("tiny-qwen", "pku-assistant"):
        column = f'.column[data-model="{model}"]'
        page.wait_for_function(f"document.querySelector('{column} .figures').textContent.includes('tok/s')",
                               timeout=60_000)
        answer = page.inner_text(f"{column} .turn.answer")
        assert IDENTITY[model] in answer
        assert "TTFT" in page.inner_text(f"{column} .figures")
    assert page.locator(".diff ins, .diff del").count() > 0  # the two answers differ, word by word
    page.check("#show-prompt")
    assert "<|im_start|>user" in page.inner_text('.column[data-model="pku-assistant"] pre.prompt')
    page.uncheck("#show-prompt")
    screenshot(page, tmp_path, "compare.png")
    # A second turn: each column continues its own conversation (its prompt holds its own first answer).
    page.fill("#message", "Who are you?")
    page.click("#send")
    page.wait_for_function("[...document.querySelectorAll('.column .figures')].filter("
                           "f => f.textContent.includes('tok/s')).length === 4", timeout=60_000)
    for model in ("tiny-qwen", "pku-assistant"):
        prompts = page.query_selector_all(f'.column[data-model="{model}"] pre.prompt')
        assert len(prompts) == 2
        second = prompts[1].text_content()
        assert IDENTITY[model] in second and "Who are you?" in second
        assert all(other not in second for name, other in IDENTITY.items() if name != model)
    screenshot(page, tmp_path, "compare-two-turns.png")


def test_the_arena_hides_names_until_the_vote_then_records_it(server: str, page: Any, tmp_path: Path) -> None:
    before = httpx.get(f"{server}/v1/leaderboard", timeout=30).json()["battles"]
    served = {m["id"] for m in httpx.get(f"{server}/v1/models").json()["data"]}
    page.goto(f"{server}/arena")
    page.fill("#message", "你好，你是谁？")
    page.click("#send")
    page.wait_for_function("!document.querySelector('#vote-a').disabled", timeout=60_000)
    names = page.inner_text("#name-A") + page.inner_text("#name-B")
    assert names == ""
    headings = page.inner_text("#slot-A h2") + page.inner_text("#slot-B h2")
    assert not any(model in headings for model in served)
    assert page.inner_text("#answer-A") and page.inner_text("#answer-B")
    screenshot(page, tmp_path, "arena-before-vote.png")
    page.click("#vote-a")
    page.wait_for_function("document.querySelector('#name-A').textContent !== ''", timeout=30_000)
    a, b = page.inner_text("#name-A"), page.inner_text("#name-B")
    assert {a, b} <= served and a != b
    board = httpx.get(f"{server}/v1/leaderboard", timeout=30).json()
    assert board["battles"] == before + 1
    winner = {m["model"]: m for m in board["models"]}[a]
    assert winner["wins"] >= 1
    screenshot(page, tmp_path, "arena.png")


def test_the_leaderboard_draws_its_chart(server: str, page: Any, tmp_path: Path) -> None:
    ids = {}
    for _ in range(3):
        results = httpx.post(f"{server}/v1/compare", timeout=60, json={
            "models": ["tiny-qwen", "pku-assistant", "cat-assistant"], "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]}).json()["results"]
        ids = {r["model"]: r["response_id"] for r in results}
        for a, b, outcome in (("pku-assistant", "tiny-qwen", "a"), ("cat-assistant", "tiny-qwen", "tie"),
                              ("pku-assistant", "cat-assistant", "a"), ("tiny-qwen", "cat-assistant", "a")):
            vote = httpx.post(f"{server}/v1/feedback", json={"response_ids": [ids[a], ids[b]], "outcome": outcome})
            assert vote.status_code == 200
    page.goto(f"{server}/leaderboard")
    page.wait_for_function("document.querySelector('#chart').dataset.drawn !== undefined", timeout=60_000)
    board = httpx.get(f"{server}/v1/leaderboard", timeout=30).json()
    assert page.eval_on_selector("#chart", "c => c.dataset.drawn") == str(len(board["models"]))
    rows = page.inner_text("#ratings tbody")
    assert all(m["model"] in rows for m in board["models"])
    # The chart has ink: a good share of its pixels are not background.
    inked = page.eval_on_selector("#chart", """c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }""")
    assert inked > 500
    assert "pku-assistant" in page.inner_text("#variants tbody")
    screenshot(page, tmp_path, "leaderboard.png")
