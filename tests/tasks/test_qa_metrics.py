"""SQuAD v1.1 exact match and F1 against worked examples computed by hand, and the official logic."""

from __future__ import annotations

import json
import random
import re
import string
from collections import Counter

import pytest

from peftlab.tasks.qa_metrics import exact_match_score, f1_score, normalize_answer, squad_scores
from tests.conftest import DATA


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The  Denver Broncos!", "denver broncos"),
        ("an apple a day", "apple day"),
        ("Theater, anatomy and athens", "theater anatomy and athens"),  # articles only as whole words
        ("U.S. state-of-the-art", "us stateoftheart"),  # punctuation removed before articles
        ("  ", ""),
        ("Éclair À la carte", "éclair à la carte"),  # non-ASCII letters stay, lower-cased
    ],
)
def test_normalisation(text: str, normalised: str) -> None:
    assert normalize_answer(text) == normalised


def test_f1_by_hand() -> None:
    # pred [broncos] vs [denver broncos]: P = 1/1, R = 1/2 -> F1 = 2 * 1 * 0.5 / 1.5 = 2/3
    assert f1_score("Broncos", "Denver Broncos") == pytest.approx(2 / 3)
    # pred [denver broncos won] vs [denver broncos]: P = 2/3, R = 1 -> F1 = 0.8
    assert f1_score("the Denver Broncos won", "Denver Broncos") == pytest.approx(0.8)
    # repeated tokens count with multiplicity: [x y y] vs [y y z]: 2 shared, P = R = 2/3
    assert f1_score("x y y", "y y z") == pytest.approx(2 / 3)
    assert f1_score("", "Denver") == 0 and f1_score("Denver", "the") == 0  # "the" normalises to nothing
    assert exact_match_score("the Denver Broncos.", "denver   broncos") and not exact_match_score("Broncos", "Denver")


def test_worked_example_max_over_gold_answers_and_x100() -> None:
    predictions = ["Denver Broncos", "Broncos", "", "Santa Clara, California"]
    truths = [
        ["Denver Broncos", "The Broncos"],  # EM 1, F1 1
        ["Denver Broncos", "the Carolina Panthers"],  # EM 0, F1 max(2/3, 0) = 2/3
        ["Santa Clara"],  # empty prediction: EM 0, F1 0
        ["Levi's Stadium", "Santa Clara"],  # [santa clara california] vs [santa clara]: P 2/3, R 1 -> 0.8
    ]
    scores = squad_scores(predictions, truths)
    assert scores["exact_match"] == 100.0 * 1 / 4 == 25.0
    assert scores["f1"] == 100.0 * (1 + 2 / 3 + 0 + 0.8) / 4  # the official script's order of operations
    assert f"{scores['f1']:.4f}" == "61.6667"


def official_evaluate(dataset: list, predictions: dict) -> dict:
    """The official SQuAD v1.1 `evaluate` (evaluate-v1.1.py), transcribed as an independent reference."""

    def normalize(s):
        def remove_articles(text):
            return re.sub(r"\b(a|an|the)\b", " ", text)

        def white_space_fix(text):
            return " ".join(text.split())

        def remove_punc(text):
            exclude = set(string.punctuation)
            return "".join(ch for ch in text if ch not in exclude)

        return white_space_fix(remove_articles(remove_punc(s.lower())))

    def f1(prediction, ground_truth):
        p, g = normalize(prediction).split(), normalize(ground_truth).split()
        num_same = sum((Counter(p) & Counter(g)).values())
        if num_same == 0:
            return 0
        precision, recall = 1.0 * num_same / len(p), 1.0 * num_same / len(g)
        return (2 * precision * recall) / (precision + recall)

    def em(prediction, ground_truth):
        return normalize(prediction) == normalize(ground_truth)

    f1_total = exact_match = total = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                truths = [x["text"] for x in qa["answers"]]
                prediction = predictions[qa["id"]]
                exact_match += max(em(prediction, t) for t in truths)
                f1_total += max(f1(prediction, t) for t in truths)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1_total / total}


def test_agrees_with_the_official_logic_to_the_last_digit_on_a_predictions_file() -> None:
    dataset = json.loads((DATA / "squad_tiny.json").read_text())["data"]
    qas = [qa for article in dataset for p in article["paragraphs"] for qa in p["qas"]]
    contexts = {qa["id"]: p["context"] for article in dataset for p in article["paragraphs"] for qa in p["qas"]}
    rng = random.Random(0)
    for _ in range(20):  # random spans of the context, some gold answers, some empty
        predictions = {}
        for qa in qas:
            words = contexts[qa["id"]].split()
            start = rng.randrange(len(words))
            choice = rng.random()
            predictions[qa["id"]] = (
                qa["answers"][0]["text"] if choice < 0.3 else "" if choice < 0.4 else " ".join(words[start : start + 3])
            )
        ours = squad_scores([predictions[qa["id"]] for qa in qas], [[a["text"] for a in qa["answers"]] for qa in qas])
        assert ours == official_evaluate(dataset, predictions)


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError):
        squad_scores(["a"], [])
