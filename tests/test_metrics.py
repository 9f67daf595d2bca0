"""Classification metrics against hand-computed values."""

from __future__ import annotations

import pytest

from peftlab.metrics import classification_metrics, confusion_matrix


def test_confusion_matrix_rows_are_truth_columns_are_predictions() -> None:
    m = confusion_matrix(["a", "a", "b", "c"], ["a", "b", "b", "a"], ["a", "b", "c"])
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_hand_computed_case() -> None:
    # truth:      a a a b b c
    # prediction: a a b b c c
    result = classification_metrics(list("aaabbc"), list("aabbcc"), ["a", "b", "c"])
    assert result["accuracy"] == pytest.approx(4 / 6)
    # a: P=2/2 R=2/3 F1=0.8 ; b: P=1/2 R=1/2 F1=0.5 ; c: P=1/2 R=1 F1=2/3
    assert result["per_class"]["a"] == {
        "precision": 1.0,
        "recall": pytest.approx(2 / 3),
        "f1": pytest.approx(0.8),
        "support": 3,
    }
    assert result["per_class"]["b"]["f1"] == pytest.approx(0.5)
    assert result["per_class"]["c"]["f1"] == pytest.approx(2 / 3)
    assert result["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert result["predicted_share"] == {
        "a": pytest.approx(2 / 6),
        "b": pytest.approx(2 / 6),
        "c": pytest.approx(2 / 6),
    }
    assert result["true_share"]["a"] == pytest.approx(0.5)


def test_class_never_predicted_has_zero_precision_and_f1() -> None:
    result = classification_metrics(["a", "b"], ["a", "a"], ["a", "b"])
    assert result["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert result["per_class"]["a"]["precision"] == 0.5
