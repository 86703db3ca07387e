"""The eval report in a real headless browser: the chart's bars follow the metrics, one table row per example."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.eval.report import word_diff
from tests.gateway.eval.conftest import EvalRun

METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def test_word_diff_marks_what_differs_in_words() -> None:
    pieces = [(p.kind, p.text) for p in word_diff("我是北大人工智能助手", "我是通义千问助手")]
    assert pieces == [("equal", "我是"), ("del", "北大人工智能"), ("ins", "通义千问"), ("equal", "助手")]
    assert [(p.kind, p.text) for p in word_diff("I am PKU.", "I am Qwen.")] == [
        ("equal", "I am "), ("del", "PKU"), ("ins", "Qwen"), ("equal", ".")]


def test_the_report_renders_its_chart_and_table(identity_eval: EvalRun, chromium: Any, tmp_path: Path) -> None:
    report = identity_eval.out / "report.html"
    results = {m: json.loads((identity_eval.out / m / "predict_results.json").read_text())
               for m in ("tiny-qwen", "pku-assistant")}
    page = chromium.new_page(viewport={"width": 1400, "height": 900})
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(report.as_uri())
    page.wait_for_selector("#chart rect.bar")

    bars = page.eval_on_selector_all("#chart rect.bar", """rects => rects.map(r => {
        const box = r.getBoundingClientRect();
        return {model: r.dataset.model, metric: r.dataset.metric, value: Number(r.dataset.value),
                height: box.height, width: box.width, bottom: box.bottom};
    })""")
    assert len(bars) == 2 * len(METRICS)
    drawn = {(b["model"], b["metric"]): b for b in bars}
    for model, result in results.items():
        for metric in METRICS:
            bar = drawn[(model, metric)]
            assert bar["value"] == pytest.approx(result[f"predict_{metric}"])
            assert bar["width"] > 0
    # Heights on screen are proportional to the scores (one scale for all bars), and all bars stand on one axis.
    scale = {round(b["height"] / b["value"], 2) for b in bars if b["value"] > 0}
    assert len(scale) == 1 and scale.pop() > 0
    assert len({round(b["bottom"]) for b in bars}) == 1
    for metric in ("rouge-l", "bleu-4"):
        assert drawn[("pku-assistant", metric)]["height"] > drawn[("tiny-qwen", metric)]["height"]

    rows = page.locator("#examples tr.example")
    assert rows.count() == 20
    first = rows.nth(0)
    assert "你好，你是谁？" in first.inner_text()
    answers = first.locator("td.answer")
    assert answers.count() == 2
    # The adapter's answer is the label (nothing marked); the base's differs from it, marked both ways.
    pku = first.locator('td.answer[data-model="pku-assistant"]')
    assert pku.locator("ins, del").count() == 0
    base = first.locator('td.answer[data-model="tiny-qwen"]')
    assert base.locator("ins").count() > 0 and base.locator("del").count() > 0
    assert all(url.startswith("file://") for url in requests), requests  # self-contained: nothing fetched

    screenshot = tmp_path / "eval-report.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")
    page.close()
