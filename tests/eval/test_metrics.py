"""The eval metrics against hand-computed values and the libraries they wrap."""

import math

import numpy as np
import pytest
import sacrebleu

from slmctl.eval.metrics import (
    bootstrap_by_group,
    VALID_METRICS,
    MetricResult,
    bootstrap_ci,
    bootstrap_corpus_ci,
    corpus_bleu,
    exact_match,
    normalize_answer,
    rouge,
    score_examples,
    squad_f1,
)

# ----------------------------------------------------------------------------- SQuAD


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Cat", "cat"),                               # case + article
        ("a cat, an owl and the dog!", "cat owl and dog"),  # articles and punctuation
        ("  New\tYork \n City ", "new york city"),        # whitespace collapsed
        ("U.S.A.", "usa"),                                 # punctuation removed, not replaced by spaces
        ("theater another", "theater another"),           # articles only as whole words
        ("The", ""),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_normalises_and_takes_max_over_references():
    assert exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["eiffel tower"]) == 0.0
    assert exact_match("Paris", ["London", "paris.", "France"]) == 1.0


def test_f1_partial_overlap():
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]: precision 2/2, recall 2/3
    assert squad_f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert squad_f1("cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts clipped: precision 1/2, recall 1
    assert squad_f1("dog", ["cat"]) == 0.0


def test_f1_max_over_references():
    # vs "cat sat down": 0.8; vs "cat": precision 1/2, recall 1 -> 2/3; vs "dog": 0
    assert squad_f1("the cat sat", ["dog", "cat", "a cat sat down"]) == pytest.approx(0.8)
    assert squad_f1("the cat sat", ["dog", "cat"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("references", [[], [""], ["", "  "], ["the", "."]])
def test_unanswerable_rules(references):
    # no reference, or every reference normalises to "": right only when the prediction is empty too
    assert exact_match("", references) == 1.0
    assert squad_f1("", references) == 1.0
    assert exact_match("a.", references) == 1.0  # normalises to ""
    assert exact_match("Paris", references) == 0.0
    assert squad_f1("Paris", references) == 0.0


def test_empty_references_are_ignored_when_others_exist():
    # SQuAD v2: golds that normalise to "" are dropped, so an empty prediction is wrong here
    assert exact_match("", ["", "Paris"]) == 0.0
    assert squad_f1("", ["", "Paris"]) == 0.0
    assert exact_match("Paris", ["", "Paris"]) == 1.0


# ----------------------------------------------------------------------------- ROUGE


def test_rouge_identical_and_disjoint():
    scores = rouge(["the cat sat on the mat", "red green blue"], ["the cat sat on the mat", "one two three"])
    for rouge_type in ("rouge1", "rouge2", "rougeLsum"):
        assert scores[rouge_type] == [1.0, 0.0]


def test_rouge1_hand_computed():
    # 6 tokens each; shared unigrams the(2), cat, on -> 4: precision = recall = 4/6
    # bigrams: "the cat", "on the" shared out of 5 each -> 2/5
    scores = rouge(["the cat sat on the mat"], ["the cat lay on the rug"], types=("rouge1", "rouge2"))
    assert scores["rouge1"][0] == pytest.approx(2 / 3)
    assert scores["rouge2"][0] == pytest.approx(2 / 5)


def test_rouge_uses_stemmer():
    assert rouge(["running"], ["run"], types=("rouge1",))["rouge1"] == [1.0]


def test_rougelsum_scores_sentences_separately():
    # swapped sentence order: one LCS over the whole text matches only 3 of 6 tokens,
    # the summary-level LCS matches each sentence to its counterpart
    prediction, reference = "the cat sat.\nthe dog ran.", "the dog ran.\nthe cat sat."
    scores = rouge([prediction], [reference], types=("rougeL", "rougeLsum"))
    assert scores["rougeL"][0] == pytest.approx(0.5)
    assert scores["rougeLsum"][0] == pytest.approx(1.0)


def test_rougelsum_splits_sentences_without_newlines():
    scores = rouge(["The cat sat. The dog ran!"], ["The dog ran? The cat sat."], types=("rougeL", "rougeLsum"))
    assert scores["rougeL"][0] == pytest.approx(0.5)
    assert scores["rougeLsum"][0] == pytest.approx(1.0)


def test_rouge_length_mismatch():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])


# ----------------------------------------------------------------------------- BLEU


def test_bleu_identical_is_100():
    sentences = ["the quick brown fox jumps over the lazy dog", "a man is playing the guitar on stage"]
    assert corpus_bleu(sentences, sentences) == pytest.approx(100.0)


def test_bleu_hand_computed_and_matches_sacrebleu():
    # n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty): BLEU = (1/12)^(1/4)
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(100 * (1 / 12) ** 0.25)
    predictions = ["The quick brown fox jumps over the lazy dog.", "A man is playing a guitar on stage.", "It is raining heavily today."]
    references = ["The fast brown fox jumped over the lazy dog.", "A man plays the guitar on a stage.", "Today it is raining a lot."]
    expected = sacrebleu.corpus_bleu(predictions, [references]).score
    assert corpus_bleu(predictions, references) == pytest.approx(expected)
    assert corpus_bleu(predictions, references) == pytest.approx(26.5299, abs=1e-3)


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_is_deterministic_and_contains_the_mean():
    data = np.random.default_rng(1).random(50)
    first = bootstrap_ci(data, n_resamples=500, seed=3)
    assert first == bootstrap_ci(list(data), n_resamples=500, seed=3)
    assert first != bootstrap_ci(data, n_resamples=500, seed=4)
    mean, low, high = first
    assert mean == pytest.approx(data.mean())
    assert low < mean < high


def test_bootstrap_narrows_with_more_data():
    rng = np.random.default_rng(0)
    _, low_small, high_small = bootstrap_ci(rng.random(20) < 0.5, n_resamples=500)
    _, low_big, high_big = bootstrap_ci(rng.random(2000) < 0.5, n_resamples=500)
    assert high_big - low_big < (high_small - low_small) / 4  # width ~ 1/sqrt(n): 10x narrower expected


def test_bootstrap_width_matches_normal_approximation():
    data = np.random.default_rng(2).random(400)
    _, low, high = bootstrap_ci(data, n_resamples=2000)
    normal_width = 2 * 1.96 * data.std() / math.sqrt(len(data))
    assert high - low == pytest.approx(normal_width, rel=0.15)


def test_bootstrap_constant_data():
    for data in ([0.3] * 10, [0.7] * 7, [1.0]):
        mean, low, high = bootstrap_ci(data, n_resamples=100)
        assert mean == pytest.approx(data[0])  # not bit-exact: ten 0.3s sum to 2.9999999999999996
        assert low == high == mean


def test_bootstrap_by_group_gives_each_group_its_own_interval():
    # shapes_vqa's per-kind report: a kind answered perfectly is [1, 1] whatever the other kinds score
    scores = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    kinds = ["colour", "shape", "colour", "shape", "shape", "colour", "colour", "count"]
    by_kind = bootstrap_by_group(scores, kinds, n_resamples=200, seed=3)
    assert list(by_kind) == ["colour", "count", "shape"]
    assert by_kind["colour"] == (1.0, 1.0, 1.0) and by_kind["count"] == (0.0, 0.0, 0.0)
    mean, low, high = by_kind["shape"]
    assert mean == pytest.approx(1 / 3) and (low, high) == bootstrap_ci([0.0, 1.0, 0.0], n_resamples=200, seed=3)[1:]
    with pytest.raises(ValueError):
        bootstrap_by_group(scores, kinds[:-1])  # every score needs its group


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=1.0)


def test_bootstrap_corpus_ci_on_bleu():
    predictions = ["the cat sat on the mat", "a dog ran in the park", "birds fly south", "he reads a book", "it rains today"]
    references = ["the cat sat on a mat", "the dog ran in a park", "birds fly north", "she reads the book", "it is raining today"]
    value, low, high = bootstrap_corpus_ci(predictions, references, corpus_bleu, n_resamples=200, seed=0)
    assert value == pytest.approx(corpus_bleu(predictions, references))
    assert low <= value <= high
    assert low < high
    assert (value, low, high) == bootstrap_corpus_ci(predictions, references, corpus_bleu, n_resamples=200, seed=0)


# ----------------------------------------------------------------------------- score_examples


def test_score_examples_squad_with_has_ans_and_no_ans_split():
    predictions = ["Paris", "the cat sat", "blue", "", "Berlin"]
    references = [["Paris", "paris, France"], ["a cat sat down"], ["red"], [], []]
    # per example EM: 1, 0, 0, 1, 0   F1: 1, 0.8, 0, 1, 0
    metrics = ["exact_match", "f1", "exact_match_has_ans", "f1_has_ans", "exact_match_no_ans", "f1_no_ans", "answer_length"]
    results = score_examples(predictions, references, metrics, n_resamples=200)
    assert list(results) == metrics
    assert results["exact_match"].value == pytest.approx(2 / 5)
    assert results["f1"].value == pytest.approx(2.8 / 5)
    assert (results["exact_match_has_ans"].value, results["exact_match_has_ans"].n) == (pytest.approx(1 / 3), 3)
    assert (results["f1_has_ans"].value, results["f1_has_ans"].n) == (pytest.approx(1.8 / 3), 3)
    assert (results["exact_match_no_ans"].value, results["exact_match_no_ans"].n) == (pytest.approx(1 / 2), 2)
    assert (results["f1_no_ans"].value, results["f1_no_ans"].n) == (pytest.approx(1 / 2), 2)
    assert results["answer_length"].value == pytest.approx((1 + 3 + 1 + 0 + 1) / 5)
    for result in results.values():
        assert result.low <= result.value <= result.high
    assert results["f1"].to_dict() == {"name": "f1", "value": results["f1"].value, "low": results["f1"].low,
                                       "high": results["f1"].high, "n": 5}


@pytest.mark.parametrize("answer", ["the", "!", ""])
def test_an_answer_that_normalises_to_empty_is_still_has_ans(answer):
    # the official SQuAD v2 script: NoAns means an empty answer list, not an answer that normalises to ""
    results = score_examples(["", "Paris"], [[answer], []], ["exact_match_has_ans", "exact_match_no_ans"],
                             n_resamples=50)
    assert (results["exact_match_has_ans"].n, results["exact_match_no_ans"].n) == (1, 1)
    assert results["exact_match_has_ans"].value == 1.0  # scored against "": the empty prediction is right
    assert results["exact_match_no_ans"].value == 0.0


def test_score_examples_skips_empty_subsets():
    results = score_examples(["Paris"], [["Paris"]], ["exact_match_has_ans", "exact_match_no_ans"], n_resamples=50)
    assert list(results) == ["exact_match_has_ans"]
    assert results["exact_match_has_ans"] == MetricResult("exact_match_has_ans", 1.0, 1.0, 1.0, 1)


def test_score_examples_generation_metrics_use_first_reference():
    predictions = ["the cat sat on the mat", "a dog ran in the park"]
    references = [["the cat sat on a mat", "unrelated words here"], ["the dog ran in a park"]]
    results = score_examples(predictions, references, ["rouge1", "rouge2", "rougeLsum", "bleu"], n_resamples=100)
    first = [refs[0] for refs in references]
    expected_rouge = rouge(predictions, first)
    for rouge_type in ("rouge1", "rouge2", "rougeLsum"):
        assert results[rouge_type].value == pytest.approx(np.mean(expected_rouge[rouge_type]))
        assert 0.0 <= results[rouge_type].value <= 1.0
        assert results[rouge_type].n == 2
    assert results["bleu"].value == pytest.approx(corpus_bleu(predictions, first))
    assert results["bleu"].value > 1.0  # sacrebleu's 0..100 scale


def test_score_examples_unknown_metric():
    with pytest.raises(ValueError, match=r"unknown metric\(s\) 'meteor'; valid: exact_match, f1, .*bleu"):
        score_examples(["a"], [["a"]], ["f1", "meteor"])
    assert "rougeLsum" in VALID_METRICS and "f1_no_ans" in VALID_METRICS
