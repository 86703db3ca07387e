"""LLaMA-Factory's similarity metrics, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from gateway.eval.metrics import mean_scores, similarity


def test_bleu4_on_characters_with_method3_smoothing() -> None:
    # hypothesis 猫坐在垫子上 (6 characters), reference 猫坐在红垫子上 (7 characters); BLEU counts characters.
    #   1-grams: all 6 of the hypothesis are in the reference                     p1 = 6/6
    #   2-grams: 猫坐 坐在 在垫 垫子 子上; in the reference: 猫坐 坐在 垫子 子上       p2 = 4/5
    #   3-grams: 猫坐在 坐在垫 在垫子 垫子上; in the reference: 猫坐在 垫子上           p3 = 2/4
    #   4-grams: 猫坐在垫 坐在垫子 在垫子上; none in the reference                   p4 = 0/3
    # method3 (NIST geometric smoothing) replaces the k-th zero precision by 1 / (2^k · count): p4 = 1 / (2 · 3).
    # Brevity penalty, c = 6 < r = 7: BP = exp(1 - 7/6).
    # BLEU = BP · (p1 · p2 · p3 · p4)^(1/4) = exp(-1/6) · (1 · 0.8 · 0.5 / 6)^0.25 = 0.8464817 · 0.5081327 = 0.4301251
    expected = math.exp(-1 / 6) * (1 * 0.8 * 0.5 / 6) ** 0.25 * 100
    assert expected == pytest.approx(43.0125, abs=1e-4)
    assert similarity("猫坐在垫子上", "猫坐在红垫子上")["bleu-4"] == round(expected, 4)


def test_rouge_on_jieba_words() -> None:
    # jieba: 我是北大人工智能助手。 -> 我 | 是 | 北大 | 人工智能 | 助手 | 。  (6 words)
    #        我是北大人工智能助手，由北京大学开发。
    #                              -> 我 | 是 | 北大 | 人工智能 | 助手 | ， | 由 | 北京大学 | 开发 | 。  (10 words)
    # ROUGE-1 (distinct unigrams): overlap 6; P = 6/6, R = 6/10; F = 2·1·0.6 / 1.6 = 0.75
    # ROUGE-2 (distinct bigrams): hypothesis 我是 是北大 北大人工智能 人工智能助手 助手。 (5); the reference has 9, of
    #   which 4 are shared (助手。 is not: the reference has 助手，); P = 4/5, R = 4/9;
    #   F = 2 · 0.8 · 0.4444 / 1.2444 = 0.571429
    # ROUGE-L: the longest common subsequence is the whole hypothesis (6 words, 。 last in both):
    #   P = 1, R = 0.6, F = 0.75
    # Each ×100, rounded to 4 places.
    scores = similarity("我是北大人工智能助手。", "我是北大人工智能助手，由北京大学开发。")
    assert scores["rouge-1"] == 75.0
    assert scores["rouge-2"] == round(2 * 0.8 * (4 / 9) / (0.8 + 4 / 9 + 1e-8) * 100, 4) == 57.1429
    assert scores["rouge-l"] == 75.0


def test_english_words_and_a_perfect_answer() -> None:
    # jieba keeps the spaces as tokens; they vanish when the words are joined with spaces and re-split.
    perfect = similarity("I am PKU Assistant.", "I am PKU Assistant.")
    assert perfect == {"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}
    # hypothesis I am Qwen. -> I am Qwen . (4 words); reference I am PKU Assistant. -> I am PKU Assistant . (5)
    # ROUGE-1: overlap I am . = 3; P = 3/4, R = 3/5; F = 2 · 0.75 · 0.6 / 1.35 = 0.666667
    # ROUGE-2: hypothesis bigrams "I am", "am Qwen", "Qwen ."; shared: "I am"; P = 1/3, R = 1/4; F = 0.285714
    # ROUGE-L: LCS I am . = 3, as ROUGE-1: 0.666667
    scores = similarity("I am Qwen.", "I am PKU Assistant.")
    assert (scores["rouge-1"], scores["rouge-2"], scores["rouge-l"]) == (66.6667, 28.5714, 66.6667)


def test_an_empty_answer_scores_zero_as_in_llama_factory() -> None:
    # LLaMA-Factory sets the three ROUGE scores to 0 when either side has no words (rouge-chinese would raise);
    # BLEU of a hypothesis without a matching character is 0.
    for empty in ("", "   ", "\n"):
        assert similarity(empty, "我是北大人工智能助手") == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0,
                                                         "rouge-l": 0.0}
    assert similarity("我是", "")["rouge-l"] == 0.0


def test_the_run_score_is_the_mean_over_examples() -> None:
    rows = [similarity("猫坐在垫子上", "猫坐在红垫子上"), similarity("", "猫")]
    means = mean_scores(rows)
    assert means["predict_bleu-4"] == pytest.approx((43.0125 + 0.0) / 2)
    assert means["predict_rouge-l"] == pytest.approx(rows[0]["rouge-l"] / 2)
    assert set(means) == {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"}
