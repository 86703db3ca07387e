"""BLEU-4 and ROUGE-1/2/L as LLaMA-Factory's ``ComputeSimilarity`` computes them for ``do_predict``.

Per example: ROUGE F-scores from ``rouge_chinese.Rouge`` on jieba-segmented text joined with spaces (all three 0
when either side segments to nothing), BLEU-4 from nltk's ``sentence_bleu`` on characters with
``SmoothingFunction().method3``; each ×100 and rounded to 4 places. A run's score is the mean over its examples,
named ``predict_<metric>`` as LLaMA-Factory's ``predict_results.json`` names it.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable

import numpy as np

METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
Scores = dict[str, float]


LIBRARIES = {"jieba": "jieba", "nltk": "nltk", "rouge_chinese": "rouge-chinese", "tqdm": "tqdm"}


def missing_libraries() -> list[str]:
    """The distributions of the ``eval`` extra that are not installed."""
    return [dist for module, dist in LIBRARIES.items() if importlib.util.find_spec(module) is None]


def similarity(predict: str, label: str) -> Scores:
    """The four scores (0-100) of one prediction against its label."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)  # its dictionary loading otherwise logs to stderr
    hypothesis = list(jieba.cut(predict))
    reference = list(jieba.cut(label))
    scores: Scores = {}
    if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
        scores.update({"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0})
    else:
        rouge = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        scores.update({name: round(value["f"] * 100, 4) for name, value in rouge.items()})
    bleu = sentence_bleu([list(label)], list(predict), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(float(bleu) * 100, 4)
    return {name: scores[name] for name in METRICS}


def mean_scores(per_example: Iterable[Scores]) -> Scores:
    """``predict_bleu-4`` … ``predict_rouge-l``: the mean of each score over the examples (0 for none)."""
    rows = list(per_example)
    return {f"predict_{name}": float(np.mean([row[name] for row in rows])) if rows else 0.0 for name in METRICS}
