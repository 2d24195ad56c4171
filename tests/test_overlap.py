"""The answer-overlap figures of `tunelab evaluate` (inference/overlap.py) on cases whose values nltk's
`sentence_bleu(..., smoothing_function=SmoothingFunction().method3)` (on words, and on characters as LLaMA-Factory
calls it) and the plain F1 definitions give."""

from __future__ import annotations

import pytest

from tunelab.inference.overlap import answer_scores, bleu4, rouge_l, rouge_n, words

REFERENCE = words("the cat is on the mat")


@pytest.mark.parametrize(
    ("answer", "bleu", "rouge1", "rouge2", "rougel"),
    [
        ("the cat sat on the mat", 0.37991784282579627, 5 / 6, 0.6, 5 / 6),  # nltk: 0.37991784282579627
        ("the cat", 0.08047084086794415, 0.5, 1 / 3, 0.5),  # short: the brevity penalty
        ("the dog is here in a big house today", 0.05669791110976, 4 / 15, 0.0, 4 / 15),  # no bigram matches
        ("dog", 0.0, 0.0, 0.0, 0.0),  # no word in common
    ],
)
def test_each_figure_is_the_reference_implementation_s(answer, bleu, rouge1, rouge2, rougel):
    mine = words(answer)
    assert bleu4(mine, REFERENCE) == pytest.approx(bleu, abs=1e-12)
    assert rouge_n(mine, REFERENCE, 1) == pytest.approx(rouge1)
    assert rouge_n(mine, REFERENCE, 2) == pytest.approx(rouge2)
    assert rouge_l(mine, REFERENCE) == pytest.approx(rougel)


def test_answer_scores_average_in_percent():
    scores = answer_scores(["the cat is on the mat", "dog", ""], ["the cat is on the mat", "a cat", "nothing"])
    assert scores == {"exact_match": 33.33, "rouge1": 33.33, "rouge2": 33.33, "rougeL": 33.33, "bleu4": 33.33}
    assert words("It's 18°C, sunny!") == ["It", "'", "s", "18", "°", "C", ",", "sunny", "!"]
    assert words("答案是四。") == ["答", "案", "是", "四", "。"]  # a CJK character is a word


@pytest.mark.parametrize(
    ("answer", "reference", "bleu"),
    [  # nltk: sentence_bleu([list(reference)], list(answer), smoothing_function=SmoothingFunction().method3)
        ("the cat sat on the mat", "the cat is on the mat", 0.7839204411491599),
        ("dog", "the cat is on the mat", 0.0005599513583219964),
        ("模型回答问题，答案是五。", "模型回答了问题，答案是四。", 0.5974178044844201),
    ],
)
def test_bleu_is_llama_factory_s_on_characters(answer, reference, bleu):
    assert answer_scores([answer], [reference])["bleu4"] == round(100 * bleu, 2)
