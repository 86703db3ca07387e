"""``report.html``: one self-contained page (inline SVG and CSS, no script, nothing fetched) for an eval run.

A grouped bar chart of the four metrics per model (bar height proportional to the score on a 0-100 axis), then one
table row per example: the question, the label and every model's answer side by side, each answer marked against
the label word by word (jieba's segmentation, so Chinese is split into words too): ``<ins>`` for what the answer
has and the label lacks, ``<del>`` for what the label has and the answer lacks.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from gateway.eval.datasets import Example
from gateway.eval.metrics import METRICS
from gateway.eval.results import ModelRun

COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f")
PLOT_HEIGHT = 240.0
BAR_WIDTH = 28.0
GROUP_GAP = 36.0
LEFT = 48.0
TOP = 16.0


@dataclass(frozen=True)
class Bar:
    model: str
    metric: str
    value: float
    x: float
    y: float
    height: float
    color: str


@dataclass(frozen=True)
class DiffPiece:
    kind: str  # "equal", "ins" or "del"
    text: str


def bars(runs: list[ModelRun]) -> list[Bar]:
    """The chart's bars: metric groups left to right, one bar per model in each, height ∝ score/100."""
    chart = []
    group_width = BAR_WIDTH * len(runs) + GROUP_GAP
    for g, metric in enumerate(METRICS):
        for m, run in enumerate(runs):
            value = run.results()[f"predict_{metric}"]
            height = PLOT_HEIGHT * max(0.0, min(value, 100.0)) / 100.0
            chart.append(Bar(model=run.model, metric=metric, value=value, height=height,
                             x=LEFT + GROUP_GAP / 2 + g * group_width + m * BAR_WIDTH,
                             y=TOP + PLOT_HEIGHT - height, color=COLORS[m % len(COLORS)]))
    return chart


def word_diff(label: str, answer: str) -> list[DiffPiece]:
    """``answer`` against ``label`` in words: what both share, what only the answer has, what it misses."""
    import jieba

    old, new = list(jieba.cut(label)), list(jieba.cut(answer))
    pieces = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
        if op == "equal":
            pieces.append(DiffPiece("equal", "".join(new[j1:j2])))
            continue
        if i2 > i1:
            pieces.append(DiffPiece("del", "".join(old[i1:i2])))
        if j2 > j1:
            pieces.append(DiffPiece("ins", "".join(new[j1:j2])))
    return pieces


def _question(example: Example) -> str:
    users = [m for m in example.messages if m["role"] == "user"]
    return str(users[-1]["content"]) if users else ""


def render_report(runs: list[ModelRun], examples: list[Example], title: str) -> str:
    """The report page for ``runs`` (same examples, same order) as HTML text."""
    env = Environment(loader=PackageLoader("gateway.eval", "."), autoescape=select_autoescape(["html", "j2"]))
    chart = bars(runs)
    width = LEFT + (BAR_WIDTH * len(runs) + GROUP_GAP) * len(METRICS) + 8
    rows: list[dict[str, Any]] = []
    for index, example in enumerate(examples):
        answers = [{"model": run.model, "scores": run.predictions[index].scores,
                    "diff": word_diff(example.label, run.predictions[index].predict)} for run in runs]
        rows.append({"index": index, "source": example.source, "question": _question(example),
                     "history": len(example.messages) > 1, "label": example.label, "answers": answers})
    template = env.get_template("report.html.j2")
    return template.render(title=title, runs=runs, results=[run.results() for run in runs], metrics=METRICS,
                           bars=chart, width=width, height=TOP + PLOT_HEIGHT + 40, plot_height=PLOT_HEIGHT,
                           left=LEFT, top=TOP, group_width=BAR_WIDTH * len(runs) + GROUP_GAP,
                           colors=COLORS, rows=rows)


def write_report(out: Path, runs: list[ModelRun], examples: list[Example], title: str) -> Path:
    path = out / "report.html"
    path.write_text(render_report(runs, examples, title), encoding="utf-8")
    return path
