"""Specifications for tunelab.eval.metrics, with expected values worked out by hand."""

from __future__ import annotations

import math

import pytest

from tunelab.eval.metrics import bleu4, exact_match, rouge, rouge_l, rouge_n, score, words

pytestmark = pytest.mark.fast  # a pure unit: `make test-fast` runs it

PRED = "the cat sat on the mat"
REF = "the cat is on the mat"


def test_words_splits_punctuation_and_keeps_case():
    assert words("Hello, world!") == ["Hello", ",", "world", "!"]
    assert words("  two\tspaces \n") == ["two", "spaces"]
    assert words("") == []


def test_words_cuts_chinese_with_jieba():
    units = words("我喜欢机器学习")
    assert 1 < len(units) < 7
    assert "".join(units) == "我喜欢机器学习"
    mixed = words("我喜欢 Python 编程。")
    assert "Python" in mixed and all(u.strip() for u in mixed)


def test_bleu_hand_computed_with_smoothing():
    # pred: the cat sat on the mat (6) / ref: the cat is on the mat (6), so brevity penalty 1.
    # 1-grams: the x2, cat, on, mat match, sat does not -> 5/6
    # 2-grams: "the cat", "on the", "the mat" of 5 -> 3/5
    # 3-grams: "on the mat" of 4 -> 1/4
    # 4-grams: none of 3 -> smoothed 0.1/3
    # BLEU = (5/6 * 3/5 * 1/4 * 1/30) ** 0.25 = 240 ** -0.25
    assert bleu4(PRED, REF) == pytest.approx(100 * 240**-0.25, abs=1e-6)


def test_bleu_clips_repeated_words():
    # pred "the the the the" vs ref "the cat": c=4 > r=2, so no brevity penalty.
    # 1-grams: "the" clipped to its 1 use in the reference -> 1/4
    # 2-, 3-, 4-grams: 0 of 3, 2, 1 -> 0.1/3, 0.1/2, 0.1/1
    expected = 100 * (1 / 4 * 0.1 / 3 * 0.1 / 2 * 0.1 / 1) ** 0.25
    assert bleu4("the the the the", "the cat") == pytest.approx(expected, abs=1e-6)


def test_bleu_brevity_penalty():
    # every n-gram of "the cat sat on" is in the reference (4/4, 3/3, 2/2, 1/1);
    # c=4, r=6 -> BP = exp(1 - 6/4)
    assert bleu4("the cat sat on", "the cat sat on the mat") == pytest.approx(100 * math.exp(-0.5), abs=1e-6)


def test_bleu_prediction_shorter_than_four_words():
    # "cat" vs "the cat sat": p1 = 1/1; orders 2..4 have no n-grams -> 0.1/1 each; BP = exp(1 - 3/1)
    expected = 100 * math.exp(-2) * 0.1**0.75
    assert bleu4("cat", "the cat sat") == pytest.approx(expected, abs=1e-6)


def test_bleu_edges():
    assert bleu4(PRED, PRED) == 100.0
    assert bleu4("Yes", "Yes") == 100.0
    assert bleu4("", REF) == 0.0
    assert bleu4("   ", REF) == 0.0
    assert bleu4("dog", REF) == 0.0
    assert bleu4("The", "the") == 0.0  # case is kept


def test_bleu_matches_nltk_if_installed():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    smooth = nltk_bleu.SmoothingFunction().method1
    pairs = [(PRED, REF), ("the the the the", "the cat"), ("a b c d e f", "a b x d e f g h")]
    for pred, ref in pairs:
        expected = 100 * nltk_bleu.sentence_bleu([words(ref)], words(pred), smoothing_function=smooth)
        assert bleu4(pred, ref) == pytest.approx(expected, abs=1e-6)


def test_rouge_hand_computed_reordered():
    pred, ref = words("the mat sat on the cat"), words(PRED)
    assert rouge_n(pred, ref, 1) == 1.0  # same 6 words
    # bigrams: "the mat", "sat on", "on the", "the cat" shared of 5 each -> 2*4/(5+5)
    assert rouge_n(pred, ref, 2) == pytest.approx(0.8)
    # LCS "the sat on the" = 4 of 6 each -> 2*4/(6+6)
    assert rouge_l(pred, ref) == pytest.approx(2 / 3)


def test_rouge_hand_computed_unequal_lengths():
    # pred 7 words, ref 6: 1-gram overlap 6 -> P 6/7, R 6/6 -> F1 12/13
    # bigrams: "the cat", "cat was", "under the", "the bed" of 6 and 5 -> 2*4/11
    # LCS "the cat was under the bed" = 6 -> 12/13
    got = rouge("the cat was found under the bed", "the cat was under the bed")
    assert got == pytest.approx({"rouge-1": 1200 / 13, "rouge-2": 800 / 11, "rouge-l": 1200 / 13})


def test_rouge_empty_prediction():
    assert rouge("", REF) == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    assert rouge_l([], []) == 0.0


def test_exact_match_ignores_surrounding_whitespace_only():
    assert exact_match("  Paris\n", "Paris") == 100.0
    assert exact_match("Pa ris", "Paris") == 0.0
    assert exact_match("paris", "Paris") == 0.0


def test_chinese_identical_and_disjoint():
    same = "我喜欢机器学习"
    assert bleu4(same, same) == 100.0
    assert rouge(same, same) == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}
    other = "今天天气很好"
    assert bleu4(other, same) == pytest.approx(0.0, abs=1e-9)
    assert max(rouge(other, same).values()) == pytest.approx(0.0, abs=1e-9)


def test_score_averages_pairs():
    got = score([PRED, "completely different words here"], [PRED, REF])
    assert set(got) == {"exact_match", "bleu-4", "rouge-1", "rouge-2", "rouge-l"}
    assert got == pytest.approx({k: 50.0 for k in got})
    one = score([PRED], [REF])
    assert one["bleu-4"] == pytest.approx(bleu4(PRED, REF))
    assert one["rouge-l"] == pytest.approx(rouge(PRED, REF)["rouge-l"])
    assert one["exact_match"] == 0.0


def test_score_rejects_mismatched_or_empty_lists():
    with pytest.raises(ValueError):
        score(["a", "b"], ["a"])
    with pytest.raises(ValueError):
        score([], [])
