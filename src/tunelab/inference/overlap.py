"""How close generated answers are to their references: exact match, ROUGE-1/2/L and BLEU-4.

BLEU-4 is LLaMA-Factory's (its `predict_with_generate` figure for an sft run): the sentence BLEU of the answer's
characters against the reference's, spaces included, with NIST geometric smoothing for an n-gram order with no
match (nltk's `SmoothingFunction().method3`; tests/test_overlap.py holds nltk's values). ROUGE is the standard F1
on words: clipped n-gram counts, and the longest common subsequence of the whole answer, as Google's rouge-score
counts them (it also lowercases and drops punctuation; LLaMA-Factory's rouge-chinese counts distinct n-grams and
unites sentences' LCSs, which gives somewhat lower figures on repetitive text). Words are runs of letters and
digits, each CJK character on its own (jieba segments Chinese into words instead), and each other non-space
character. Exact match (the answer and reference the same but for surrounding space) is tunelab's own. Each figure
is averaged over the answers and given in percent. They compare a run with its base on the same prompts;
LLaMA-Factory's ROUGE on Chinese and its sampled answers (temperature 0.95 by default; tunelab's are greedy) make
its printed figures not quite these.
"""

from __future__ import annotations

import math
import re
from collections import Counter

# kana (half-width too) and CJK ideographs (the supplementary planes' too): one word each
CJK = "\u3040-\u30ff\uff66-\uff9f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
WORD = re.compile(f"[{CJK}]|[^\\W{CJK}]+|[^\\w\\s]")


def words(text: str) -> list[str]:
    """The words ROUGE compares: runs of letters and digits, each CJK character, each other non-space character."""
    return WORD.findall(text)


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f1(shared: int, answer: int, reference: int) -> float:
    if shared == 0:
        return 0.0
    precision, recall = shared / answer, shared / reference
    return 2 * precision * recall / (precision + recall)


def rouge_n(answer: list[str], reference: list[str], n: int) -> float:
    """F1 of the n-grams the answer shares with the reference (each counted as often as both hold it)."""
    mine, theirs = _ngrams(answer, n), _ngrams(reference, n)
    return _f1(sum((mine & theirs).values()), sum(mine.values()), sum(theirs.values()))


def rouge_l(answer: list[str], reference: list[str]) -> float:
    """F1 of the longest common subsequence (one row of the dynamic programme at a time)."""
    previous = [0] * (len(reference) + 1)
    for word in answer:
        current = [0]
        for j, other in enumerate(reference, start=1):
            current.append(previous[j - 1] + 1 if word == other else max(previous[j], current[j - 1]))
        previous = current
    return _f1(previous[-1], len(answer), len(reference))


def bleu4(answer: list[str], reference: list[str]) -> float:
    """Sentence BLEU-4 of two token lists (answer_scores gives it characters): clipped n-gram precisions (an
    order with no match smoothed to 1 / (2^k * its count), k counting such orders), their geometric mean, the
    brevity penalty; 0 when no token of the answer is in the reference."""
    if not answer:
        return 0.0
    theirs = [_ngrams(reference, n) for n in range(1, 5)]
    precisions, unmatched = [], 0
    for n in range(1, 5):
        mine = _ngrams(answer, n)
        shared, total = sum((mine & theirs[n - 1]).values()), max(sum(mine.values()), 1)
        if n == 1 and shared == 0:
            return 0.0
        if shared == 0:
            unmatched += 1
            precisions.append(1 / (2**unmatched * total))
        else:
            precisions.append(shared / total)
    brevity = 1.0 if len(answer) > len(reference) else math.exp(1 - len(reference) / len(answer))
    return brevity * math.exp(sum(math.log(p) for p in precisions) / 4)


def answer_scores(answers: list[str], references: list[str]) -> dict[str, float]:
    """Exact match, ROUGE-1/2/L and BLEU-4 of the answers against their references, averaged, in percent."""
    totals = Counter[str]()
    for answer, reference in zip(answers, references, strict=True):
        answer, reference = answer.strip(), reference.strip()  # (generate strips its answers)
        mine, theirs = words(answer), words(reference)
        totals["exact_match"] += answer == reference
        if mine and theirs:
            totals["rouge1"] += rouge_n(mine, theirs, 1)
            totals["rouge2"] += rouge_n(mine, theirs, 2)
            totals["rougeL"] += rouge_l(mine, theirs)
        totals["bleu4"] += bleu4(list(answer), list(reference))  # characters, as LLaMA-Factory scores it
    count = max(len(answers), 1)
    return {
        name: round(100 * totals[name] / count, 2) for name in ("exact_match", "rouge1", "rouge2", "rougeL", "bleu4")
    }
