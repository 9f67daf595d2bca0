"""Exact match and F1 of extractive QA, exactly as the official SQuAD v1.1 evaluation script scores.

The official script (`evaluate-v1.1.py`, Rajpurkar et al., 2016) is short and is the definition of
the metric, so its logic is reproduced here line for line rather than taken from a library (the
`evaluate` package would pull in a download of the same script at run time, which is impossible
offline). The normalisation: lower-case, drop ASCII punctuation (`string.punctuation`), drop the
articles a/an/the as whole words, collapse whitespace. Each prediction is scored against every gold
answer and the best is kept; EM and F1 are summed in example order and reported as 100 * sum / n,
in the same floating-point order as the script, so the figures agree to the last digit.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(truth)


def f1_score(prediction: str, truth: str) -> float:
    """Token-level F1 of the normalised answers (0 when they share no token)."""
    pred_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(truth).split()
    common = Counter(pred_tokens) & Counter(truth_tokens)
    same = sum(common.values())
    if same == 0:
        return 0
    precision = 1.0 * same / len(pred_tokens)
    recall = 1.0 * same / len(truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def best_over_truths(metric: Callable[[str, str], float], prediction: str, truths: Sequence[str]) -> float:
    """The official `metric_max_over_ground_truths`: the best score against any gold answer."""
    return max(metric(prediction, truth) for truth in truths)


def squad_scores(predictions: Sequence[str], truths: Sequence[Sequence[str]]) -> dict[str, float]:
    """{'exact_match', 'f1'} x100 over examples (predictions[i] answers the question with truths[i])."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} questions")
    exact_match = f1 = 0.0
    for prediction, answers in zip(predictions, truths, strict=True):
        exact_match += best_over_truths(exact_match_score, prediction, answers)
        f1 += best_over_truths(f1_score, prediction, answers)
    total = len(predictions)
    return {
        "exact_match": 100.0 * exact_match / total if total else 0.0,
        "f1": 100.0 * f1 / total if total else 0.0,
    }
