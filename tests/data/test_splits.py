"""De-duplication before splitting, and seeded deterministic splits."""

from __future__ import annotations

from peftlab.data.splits import deduplicate, split


def test_duplicates_kept_once_and_conflicts_dropped() -> None:
    rows = [
        {"text": "Good film", "label": "pos"},
        {"text": "good   FILM", "label": "pos"},  # same text after normalisation, same label: kept once
        {"text": "meh", "label": "pos"},
        {"text": "Meh", "label": "neg"},  # conflicting labels: both dropped
        {"text": "bad", "label": "neg"},
    ]
    kept, stats = deduplicate(rows)
    assert [r["text"] for r in kept] == ["Good film", "bad"]
    assert stats == {
        "input": 5,
        "kept": 2,
        "duplicate_copies_removed": 1,
        "conflicting_texts_dropped": 1,
        "conflicting_rows_dropped": 2,
    }


def test_split_is_deterministic_disjoint_and_complete() -> None:
    rows = [{"text": str(i)} for i in range(101)]
    a = split(rows, {"train": 0.8, "validation": 0.1, "test": 0.1}, seed=0)
    b = split(rows, {"train": 0.8, "validation": 0.1, "test": 0.1}, seed=0)
    c = split(rows, {"train": 0.8, "validation": 0.1, "test": 0.1}, seed=1)
    assert a == b and a != c
    assert [len(a[k]) for k in ("train", "validation", "test")] == [81, 10, 10]
    texts = [r["text"] for part in a.values() for r in part]
    assert sorted(texts) == sorted(r["text"] for r in rows)
