"""What an eval run produced, and the files LLaMA-Factory's ``do_predict`` writes for it.

Per model, in ``OUT/<model>/``:

- ``generated_predictions.jsonl``: one ``{"prompt", "predict", "label"}`` object a line (``ensure_ascii=False``),
  ``prompt`` being the exact prompt text the model received (the training template's rendering, special tokens
  included, as LLaMA-Factory decodes its input ids), ``predict`` the answer, ``label`` the dataset's answer.
- ``predict_results.json``: ``predict_bleu-4``, ``predict_rouge-1``, ``predict_rouge-2``, ``predict_rouge-l`` (see
  ``gateway.eval.metrics``), plus ``predict_runtime`` and ``predict_samples_per_second`` as the transformers
  Trainer adds them; written with ``indent=4, sort_keys=True`` as the Trainer's ``save_metrics`` writes it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from gateway.eval.metrics import Scores, mean_scores


@dataclass(frozen=True)
class Prediction:
    prompt: str
    predict: str
    label: str
    scores: Scores


@dataclass(frozen=True)
class ModelRun:
    """One model's predictions, in dataset order, and the wall time it took to get them."""

    model: str
    predictions: list[Prediction]
    seconds: float

    def results(self) -> dict[str, float]:
        results = mean_scores(p.scores for p in self.predictions)
        results["predict_runtime"] = round(self.seconds, 4)
        results["predict_samples_per_second"] = round(len(self.predictions) / self.seconds, 3) if self.seconds else 0.0
        return results


def model_dir(out: Path, model: str) -> Path:
    """``OUT/<model>``; characters a folder name cannot hold (``/`` in ``run/checkpoint-N``) become ``_``."""
    safe = re.sub(r"[^\w.+-]", "_", model).lstrip(".") or "_"
    return out / safe


def write_run(out: Path, run: ModelRun) -> Path:
    """Write ``run``'s two files under ``OUT/<model>/``; returns that folder."""
    folder = model_dir(out, run.model)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "generated_predictions.jsonl").open("w", encoding="utf-8") as file:
        for p in run.predictions:
            file.write(json.dumps({"prompt": p.prompt, "predict": p.predict, "label": p.label}, ensure_ascii=False)
                       + "\n")
    (folder / "predict_results.json").write_text(json.dumps(run.results(), indent=4, sort_keys=True) + "\n",
                                                 encoding="utf-8")
    return folder
