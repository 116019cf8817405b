"""Metrics for `slmctl eval`: SQuAD exact match / F1, ROUGE, BLEU, and bootstrap confidence intervals.

Why this module exists: a number without its interval says little on the few hundred examples a
small-model eval usually has, and hand-rolled metrics drift from the published ones. So the SQuAD
metrics follow the official v2.0 evaluation script line for line, ROUGE is `rouge_score` (the
package the ROUGE numbers in papers come from) and BLEU is `sacrebleu` (default 13a tokenisation);
every mean comes with a seeded percentile-bootstrap interval.

Scales: exact match, F1 and ROUGE are on 0..1; BLEU is on 0..100, as sacrebleu reports it.
"""

from __future__ import annotations

import collections
import re
import string
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

PER_EXAMPLE_METRICS = ("exact_match", "f1", "rouge1", "rouge2", "rougeLsum", "answer_length")
CORPUS_METRICS = ("bleu",)
# name -> (SQuAD metric, score the unanswerable examples?)
SQUAD_SPLIT_METRICS = {
    "exact_match_has_ans": ("exact_match", False),
    "f1_has_ans": ("f1", False),
    "exact_match_no_ans": ("exact_match", True),
    "f1_no_ans": ("f1", True),
}
VALID_METRICS = PER_EXAMPLE_METRICS + CORPUS_METRICS + tuple(SQUAD_SPLIT_METRICS)

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)
# A sentence ends at ., ! or ? followed by whitespace. Deliberately simple: "e.g. x" and "Dr. Smith" split too.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# ---------------------------------------------------------------------------------------------
# SQuAD (official v1.1 / v2.0 evaluation script semantics)
# ---------------------------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _gold_answers(references: Sequence[str]) -> list[str]:
    """References that survive normalisation; `[""]` when none do (an unanswerable question), as in SQuAD v2."""
    golds = [ref for ref in references if normalize_answer(ref)]
    return golds or [""]


def is_unanswerable(references: Sequence[str]) -> bool:
    """True when there is no reference: the official script's NoAns rule (`bool(qa["answers"])`).
    A reference that normalises to "" ("the", "!") still makes a HasAns example; only its
    scoring treats it as the empty answer."""
    return len(references) == 0


def _f1_one(prediction: str, reference: str) -> float:
    """Token-level F1 of one prediction against one reference, after normalisation."""
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    num_same = sum((collections.Counter(pred_tokens) & collections.Counter(ref_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 if the normalised prediction equals some normalised reference, else 0.0.

    Unanswerable (no reference, or all references normalise to ""): 1.0 iff the normalised prediction is empty.
    """
    normalized = normalize_answer(prediction)
    return max(float(normalized == normalize_answer(gold)) for gold in _gold_answers(references))


def squad_f1(prediction: str, references: list[str]) -> float:
    """Token F1 after normalisation, max over references; unanswerable: 1.0 iff the prediction is empty too."""
    return max(_f1_one(prediction, gold) for gold in _gold_answers(references))


# ---------------------------------------------------------------------------------------------
# ROUGE and BLEU (the libraries do the work)
# ---------------------------------------------------------------------------------------------

def _one_sentence_per_line(text: str) -> str:
    """Text with one sentence per line, which is how rouge_score's rougeLsum finds sentences.

    Text that already has newlines is taken to be split already and is kept as it is; otherwise
    sentences are split on [.!?] followed by whitespace (a plain regex, not a sentence tokenizer).
    """
    if "\n" in text:
        return text
    return "\n".join(_SENTENCE_END.split(text.strip()))


def rouge(
    predictions: list[str], references: list[str], types: Sequence[str] = ("rouge1", "rouge2", "rougeLsum")
) -> dict[str, list[float]]:
    """Per-example ROUGE F-measures (0..1) for each type, Porter stemming on.

    For rougeLsum, texts without newlines are first split into one sentence per line (see
    `_one_sentence_per_line`). That only swaps whitespace for newlines, and rouge_score's tokenizer
    treats both as separators, so rouge1/rouge2/rougeL see the same tokens either way.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    out: dict[str, list[float]] = {rouge_type: [] for rouge_type in types}
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(_one_sentence_per_line(reference), _one_sentence_per_line(prediction))
        for rouge_type in types:
            out[rouge_type].append(float(scores[rouge_type].fmeasure))  # rouge_score gives int 0 for empty rougeLsum
    return out


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """sacrebleu corpus BLEU (0..100) with one reference per prediction and default 13a tokenisation."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


# ---------------------------------------------------------------------------------------------
# Bootstrap confidence intervals
# ---------------------------------------------------------------------------------------------

def _check_bootstrap_args(n: int, n_resamples: int, confidence: float) -> None:
    if n == 0:
        raise ValueError("cannot bootstrap an empty sample")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _percentile_interval(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1.0 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(
    per_example: list[float] | np.ndarray, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the sample mean and a percentile-bootstrap interval for it, reproducible from `seed`."""
    values = np.asarray(per_example, dtype=np.float64)
    _check_bootstrap_args(len(values), n_resamples, confidence)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for i in range(n_resamples):  # one resample at a time: memory stays O(n) however large the eval set
        means[i] = values[rng.integers(0, len(values), len(values))].mean()
    low, high = _percentile_interval(means, confidence)
    return float(values.mean()), low, high


def bootstrap_by_group(per_example, groups, n_resamples: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """{group: (mean, low, high)}: `bootstrap_ci` of each group's examples alone (e.g. each question
    kind of shapes_vqa), groups in sorted order."""
    values: dict[str, list[float]] = {}
    for value, group in zip(per_example, groups, strict=True):
        values.setdefault(group, []).append(value)
    return {group: bootstrap_ci(values[group], n_resamples, confidence, seed) for group in sorted(values)}


def paired_bootstrap_ci(
    scores: list[float] | np.ndarray, baseline: list[float] | np.ndarray, n_resamples: int = 1000, confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean difference, low, high) of `scores` - `baseline` on the same examples: each resample
    draws example indices once and takes both models' scores at them, so what the examples have
    in common (an easy question both answer) cancels out and the interval is that of the
    difference itself, narrower than two separate intervals would suggest."""
    a, b = np.asarray(scores, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same examples: {len(a)} against {len(b)}")
    return bootstrap_ci(a - b, n_resamples=n_resamples, confidence=confidence, seed=seed)


def bootstrap_corpus_ci(
    predictions: list[str],
    references: list[str],
    corpus_metric: Callable[[list[str], list[str]], float],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(value, low, high) for a corpus-level metric such as BLEU, which is not a mean of per-example scores.

    Each resample draws example indices with replacement and recomputes the metric on that corpus.
    The same seed draws the same indices as `bootstrap_ci` does for the same number of examples.
    Cost is `n_resamples` full metric calls: sacrebleu BLEU takes ~0.1 s per call on 1000 examples.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    _check_bootstrap_args(len(predictions), n_resamples, confidence)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    for i in range(n_resamples):
        idx = rng.integers(0, len(predictions), len(predictions))
        stats[i] = corpus_metric([predictions[j] for j in idx], [references[j] for j in idx])
    low, high = _percentile_interval(stats, confidence)
    return float(corpus_metric(list(predictions), list(references))), low, high


# ---------------------------------------------------------------------------------------------
# Scoring a set of examples
# ---------------------------------------------------------------------------------------------

@dataclass
class MetricResult:
    """One metric over a set of examples: its value, a bootstrap interval, and how many examples it covers."""

    name: str
    value: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def per_example_scores(predictions: list[str], references: list[list[str]], metrics: list[str]) -> dict[str, list[float]]:
    """Each example's score for the per-example metrics `metrics` needs (exact_match and f1 for any
    SQuAD metric, the ROUGE types asked for, answer_length); corpus metrics (bleu) have none."""
    first_refs = [refs[0] if refs else "" for refs in references]
    per_example: dict[str, list[float]] = {}
    if any(name in ("exact_match", "f1") or name in SQUAD_SPLIT_METRICS for name in metrics):
        per_example["exact_match"] = [exact_match(p, refs) for p, refs in zip(predictions, references)]
        per_example["f1"] = [squad_f1(p, refs) for p, refs in zip(predictions, references)]
    rouge_types = list(dict.fromkeys(name for name in metrics if name in ("rouge1", "rouge2", "rougeLsum")))
    if rouge_types:
        per_example.update(rouge(predictions, first_refs, types=rouge_types))
    if "answer_length" in metrics:
        per_example["answer_length"] = [float(len(p.split())) for p in predictions]
    return per_example


def score_examples(
    predictions: list[str], references: list[list[str]], metrics: list[str], n_resamples: int = 1000, seed: int = 0,
    per_example: dict[str, list[float]] | None = None,
) -> dict[str, MetricResult]:
    """Score predictions against references, each metric with a 95% bootstrap interval.

    Metrics: "exact_match", "f1" (SQuAD, all references), "rouge1", "rouge2", "rougeLsum", "bleu"
    (first reference, "" if there is none), "answer_length" (whitespace tokens of the prediction), and
    for SQuAD v2-style data "exact_match_has_ans", "f1_has_ans", "exact_match_no_ans", "f1_no_ans",
    which score only the answerable / unanswerable examples and are left out when that subset is empty.
    Every metric uses the same seed, so for equal n they are scored on the same resamples.
    `per_example` reuses `per_example_scores(...)` a caller already computed.
    """
    unknown = [name for name in metrics if name not in VALID_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(map(repr, unknown))}; valid: {', '.join(VALID_METRICS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no examples to score")

    first_refs = [refs[0] if refs else "" for refs in references]
    if per_example is None:
        per_example = per_example_scores(predictions, references, metrics)

    results: dict[str, MetricResult] = {}
    for name in metrics:
        if name == "bleu":
            value, low, high = bootstrap_corpus_ci(predictions, first_refs, corpus_bleu, n_resamples=n_resamples, seed=seed)
            results[name] = MetricResult(name, value, low, high, len(predictions))
            continue
        if name in SQUAD_SPLIT_METRICS:
            kind, want_unanswerable = SQUAD_SPLIT_METRICS[name]
            scores = [s for s, refs in zip(per_example[kind], references) if is_unanswerable(refs) == want_unanswerable]
        else:
            scores = per_example[name]
        if not scores:
            continue  # an empty has_ans / no_ans subset: nothing to report
        value, low, high = bootstrap_ci(scores, n_resamples=n_resamples, seed=seed)
        results[name] = MetricResult(name, value, low, high, len(scores))
    return results
