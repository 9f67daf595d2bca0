"""Metrics shared by several tasks.

Classification metrics are written with numpy rather than taken from scikit-learn: they are a
dozen exact lines, and scikit-learn would be a large dependency for them. Tests check them against
hand-computed cases. Definitions follow scikit-learn's (macro-F1 = unweighted mean of per-class F1;
a class with no predictions has precision 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_matrix(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Counts[i, j] = examples of true label i predicted as label j."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for truth, pred in zip(y_true, y_pred, strict=True):
        matrix[index[truth], index[pred]] += 1
    return matrix


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support, confusion matrix, prediction shares."""
    matrix = confusion_matrix(y_true, y_pred, labels)
    tp = np.diag(matrix).astype(float)
    predicted = matrix.sum(axis=0).astype(float)
    actual = matrix.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    total = max(int(matrix.sum()), 1)
    return {
        "accuracy": float(tp.sum() / total),
        "macro_f1": float(f1.mean()) if len(labels) else 0.0,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(actual[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion_matrix": {"labels": list(labels), "matrix": matrix.tolist()},
        "predicted_share": {label: float(predicted[i] / total) for i, label in enumerate(labels)},
        "true_share": {label: float(actual[i] / total) for i, label in enumerate(labels)},
        "n": int(matrix.sum()),
    }


def softmax_rows(outputs: Any) -> np.ndarray:
    """Row-wise softmax of a model's logits (the first element when the outputs are a tuple)."""
    logits = np.asarray(outputs[0] if isinstance(outputs, tuple) else outputs, dtype=np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)
