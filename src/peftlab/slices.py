"""Per-source slices of an evaluation, for data merged from several sources (`data.sources`).

Merged rows carry a `source` field (data/loading.py). Tasks keep each example's `id` in their
predictions, so predictions are grouped by source through the ids and each group is scored with
the task's own `score`: a fairness slice that needs nothing from the task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datasets import DatasetDict

Prediction = dict[str, Any]


def source_map(splits: DatasetDict) -> dict[str, dict[str, str]]:
    """split -> example id -> source name (empty when the rows carry no `source` field)."""
    return {
        name: dict(zip(map(str, ds["id"]), ds["source"], strict=True))
        for name, ds in splits.items()
        if {"id", "source"} <= set(ds.column_names)
    }


def source_counts(sources: dict[str, dict[str, str]]) -> dict[str, dict[str, int]]:
    """split -> source -> number of examples."""
    out: dict[str, dict[str, int]] = {}
    for split, by_id in sources.items():
        counts: dict[str, int] = {}
        for source in by_id.values():
            counts[source] = counts.get(source, 0) + 1
        out[split] = dict(sorted(counts.items()))
    return out


def score_with_sources(
    score: Callable[[list[Prediction]], dict[str, Any]], predictions: list[Prediction], sources: dict[str, str] | None
) -> dict[str, Any]:
    """The task's metrics, plus `by_source` metrics when the examples come from several sources.

    Each prediction record gets its `source` (written with the predictions).
    """
    metrics = score(predictions)
    if not sources:
        return metrics
    groups: dict[str, list[Prediction]] = {}
    for prediction in predictions:
        prediction["source"] = sources.get(str(prediction["id"]))
        groups.setdefault(prediction["source"], []).append(prediction)
    metrics["by_source"] = {name: score(group) for name, group in sorted(groups.items(), key=lambda kv: str(kv[0]))}
    return metrics
