"""Text-generation metrics on a 0..100 scale, matching what LLaMA-Factory reports.

Predictions and references are split into words first (jieba for Chinese), so the
numbers for English and Chinese training data mean the same thing: overlap of words.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections import Counter

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD_OR_PUNCT = re.compile(r"\w+|[^\w\s]")
_EPSILON = 0.1  # Chen & Cherry smoothing method 1, as in nltk's SmoothingFunction().method1


@functools.cache
def _jieba():
    """Import jieba only when Chinese text shows up; its dictionary load is slow and chatty."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


def words(text: str) -> list[str]:
    """Units that BLEU and ROUGE count.

    Chinese has no spaces, so text with CJK ideographs is cut by jieba into words
    (whitespace pieces dropped). Other text is split on whitespace with punctuation
    as its own unit, so "world!" and "world" still share a word. Case is kept:
    the model is judged on what it actually wrote.
    """
    if _CJK.search(text):
        return [w for w in _jieba().lcut(text) if w.strip()]
    return _WORD_OR_PUNCT.findall(text)


def _ngrams(units: list[str], n: int) -> Counter:
    return Counter(tuple(units[i : i + n]) for i in range(len(units) - n + 1))


def _bleu4(pred: list[str], ref: list[str]) -> float:
    if not pred:
        return 0.0
    if pred == ref:  # short perfect answers would otherwise lose to smoothing of orders they cannot have
        return 100.0
    log_sum = 0.0
    for n in range(1, 5):
        pred_grams, ref_grams = _ngrams(pred, n), _ngrams(ref, n)
        matched = sum(min(c, ref_grams[g]) for g, c in pred_grams.items())  # clipped counts
        total = max(1, sum(pred_grams.values()))  # as nltk: an order too long for the prediction counts 1
        if matched == 0:
            if n == 1:  # no word in common: nothing to smooth, as nltk returns 0
                return 0.0
            matched = _EPSILON
        log_sum += 0.25 * math.log(matched / total)
    c, r = len(pred), len(ref)
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    return 100.0 * brevity * math.exp(log_sum)


def bleu4(prediction: str, reference: str) -> float:
    """Sentence BLEU-4, 0..100: uniform weights, clipped precisions, brevity penalty.

    A zero n-gram match (orders 2..4) counts as 0.1 matches (smoothing method 1), so
    one missing 4-gram does not zero an otherwise good sentence.
    """
    return _bleu4(words(prediction), words(reference))


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    """F1 of precision overlap/n_pred and recall overlap/n_ref, written without dividing by zero."""
    return 2 * overlap / (n_pred + n_ref) if overlap else 0.0


def rouge_n(pred_words: list[str], ref_words: list[str], n: int) -> float:
    """ROUGE-N F1 in 0..1 from clipped n-gram overlap."""
    pred_grams, ref_grams = _ngrams(pred_words, n), _ngrams(ref_words, n)
    overlap = sum((pred_grams & ref_grams).values())
    return _f1(overlap, sum(pred_grams.values()), sum(ref_grams.values()))


def rouge_l(pred_words: list[str], ref_words: list[str]) -> float:
    """ROUGE-L F1 in 0..1: the longest common subsequence rewards right order without adjacency."""
    prev = [0] * (len(ref_words) + 1)
    for p in pred_words:
        row = [0]
        for j, r in enumerate(ref_words):
            row.append(prev[j] + 1 if p == r else max(prev[j + 1], row[j]))
        prev = row
    return _f1(prev[-1], len(pred_words), len(ref_words))


def _rouge(pred: list[str], ref: list[str]) -> dict[str, float]:
    return {
        "rouge-1": 100.0 * rouge_n(pred, ref, 1),
        "rouge-2": 100.0 * rouge_n(pred, ref, 2),
        "rouge-l": 100.0 * rouge_l(pred, ref),
    }


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F1 on words, 0..100; an empty side scores 0."""
    return _rouge(words(prediction), words(reference))


def exact_match(prediction: str, reference: str) -> float:
    """100.0 when equal apart from surrounding whitespace (generations often end in a newline), else 0.0."""
    return 100.0 if prediction.strip() == reference.strip() else 0.0


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean of every metric over prediction/reference pairs; unrounded, for the caller to format."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    totals = Counter()
    for prediction, reference in zip(predictions, references):
        pred, ref = words(prediction), words(reference)
        totals["exact_match"] += exact_match(prediction, reference)
        totals["bleu-4"] += _bleu4(pred, ref)
        totals.update(_rouge(pred, ref))
    keys = ("exact_match", "bleu-4", "rouge-1", "rouge-2", "rouge-l")
    return {k: totals[k] / len(predictions) for k in keys}
