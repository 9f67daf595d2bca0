"""Surface cues of multiple-choice items, and the model-free baselines that exploit them.

A careless multiple-choice set gives its answers away: the right ending is the longest, shares the
most words with the context, or ends in the telling punctuation mark. The `multiple_choice` task
reports these cue baselines beside the models (fitted on train), and the offline continuation items
(data/continuations.py) are built so that none of them beats chance. Both use this module, which
knows nothing of models.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from datasets import Dataset

Prediction = dict[str, Any]

WORD = re.compile(r"[a-z0-9']+")
# Words that say nothing about topic; overlap counts the rest (a short fixed list keeps the cue
# reproducible without a stop-word dependency).
_STOP_WORDS = (
    "a an the and or but if of to in on at by for with from as is are was were be been it its this that these "
    "those he she they we you i his her their our your my me him them us not no so than then there here what "
    "which who whom how all any some more most such too very can will just do does did has have had"
)
STOP = frozenset(_STOP_WORDS.split())


def content_words(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if w not in STOP}


def final_mark(text: str) -> str:
    """The ending's last character class: '.', '!', '?', other punctuation ('p') or none ('w')."""
    last = text.rstrip()[-1:] or " "
    return last if last in ".!?" else ("w" if last.isalnum() else "p")


# --- cue baselines ---------------------------------------------------------------------------

Chooser = Callable[[dict[str, Any], np.random.Generator], int]
Predictor = Callable[["Dataset"], list[Prediction]]


def ending_lengths(ex: dict[str, Any]) -> list[float]:
    return [float(len(e.split())) for e in ex["endings"]]


def ending_overlaps(ex: dict[str, Any]) -> list[float]:
    """Content words each ending shares with the context (and start phrase)."""
    context = content_words(f"{ex['context']} {ex['start']}")
    return [float(len(context & content_words(e))) for e in ex["endings"]]


# cue -> (name when higher wins, name when lower wins)
CUES: dict[Callable[[dict[str, Any]], list[float]], tuple[str, str]] = {
    ending_lengths: ("cue: longest ending", "cue: shortest ending"),
    ending_overlaps: ("cue: most word overlap", "cue: least word overlap"),
}


def _argbest(scores: list[float], rng: np.random.Generator) -> int:
    """Index of the highest score; ties broken at random (seeded), so a useless cue scores chance."""
    top = max(scores)
    tied = [i for i, s in enumerate(scores) if s == top]
    return tied[0] if len(tied) == 1 else int(tied[rng.integers(len(tied))])


def _predictor(choose: Chooser) -> Predictor:
    def predict(examples: Dataset) -> list[Prediction]:
        rng = np.random.default_rng(0)
        return [{"id": ex["id"], "label": ex["label"], "prediction": choose(ex, rng)} for ex in examples]

    return predict


def _by_score(cue: Callable[[dict[str, Any]], list[float]], sign: float) -> Chooser:
    return lambda ex, rng: _argbest([sign * s for s in cue(ex)], rng)


def accuracy(predictions: list[Prediction]) -> float:
    return sum(p["prediction"] == p["label"] for p in predictions) / max(len(predictions), 1)


def cue_baselines(train: Dataset) -> dict[str, Predictor]:
    """Model-free predictors from surface cues, each fitted on train (direction, mark, position)."""
    baselines: dict[str, Predictor] = {}
    for cue, names in CUES.items():
        sign = max((1.0, -1.0), key=lambda s, cue=cue: accuracy(_predictor(_by_score(cue, s))(train)))
        baselines[names[0] if sign > 0 else names[1]] = _predictor(_by_score(cue, sign))
    hits: Counter = Counter()
    seen: Counter = Counter()
    for ex in train:
        marks = [final_mark(e) for e in ex["endings"]]
        seen.update(marks)
        hits[marks[ex["label"]]] += 1
    rate = {mark: hits[mark] / seen[mark] for mark in seen}  # how often an ending with this mark is right
    baselines["cue: final punctuation"] = _predictor(
        lambda ex, rng: _argbest([rate.get(final_mark(e), 0.0) for e in ex["endings"]], rng)
    )
    position = Counter(train["label"]).most_common(1)[0][0]
    baselines["most frequent position"] = _predictor(lambda ex, rng: position)
    return baselines
