"""Deterministic de-duplication and splitting, shared by every data asset and derived split.

Duplicates are found on a normalised text key (lower-case, whitespace collapsed). Copies that
agree on the label are kept once; texts whose copies disagree are dropped entirely, because either
label would be noise. This happens *before* splitting, so no text sits in two splits.
Splits are a seeded permutation (numpy's PCG64), so the same seed gives the same split anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Row = dict[str, Any]


def text_key(text: str) -> str:
    return " ".join(str(text).lower().split())


def deduplicate(
    rows: Sequence[Row], key: Callable[[Row], str] = lambda r: text_key(r["text"]), label: str = "label"
) -> tuple[list[Row], dict[str, int]]:
    """Keep the first copy of each text; drop texts whose copies carry different labels."""
    labels: dict[str, set] = {}
    for row in rows:
        labels.setdefault(key(row), set()).add(str(row.get(label)))
    kept, seen = [], set()
    conflicting = {k for k, v in labels.items() if len(v) > 1}
    for row in rows:
        k = key(row)
        if k in conflicting or k in seen:
            continue
        seen.add(k)
        kept.append(row)
    stats = {
        "input": len(rows),
        "kept": len(kept),
        "duplicate_copies_removed": len(rows) - len(kept) - sum(1 for r in rows if key(r) in conflicting),
        "conflicting_texts_dropped": len(conflicting),
        "conflicting_rows_dropped": sum(1 for r in rows if key(r) in conflicting),
    }
    return kept, stats


def split(rows: Sequence[Row], fractions: dict[str, float], seed: int) -> dict[str, list[Row]]:
    """Seeded permutation cut into consecutive parts of the given fractions (the last takes the rest)."""
    if abs(sum(fractions.values()) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    order = np.random.default_rng(seed).permutation(len(rows))
    out: dict[str, list[Row]] = {}
    start = 0
    names = list(fractions)
    for i, name in enumerate(names):
        end = len(rows) if i == len(names) - 1 else start + round(fractions[name] * len(rows))
        out[name] = [rows[j] for j in order[start:end]]
        start = end
    return out


def split_by_group(
    rows: Sequence[Row], group: Callable[[Row], str], fractions: dict[str, float], seed: int
) -> dict[str, list[Row]]:
    """Like `split`, but whole groups (e.g. all questions about one article) go to one split.

    The groups are sorted before the seeded permutation, so the split does not depend on row order;
    the fractions are of groups, so the example counts per split follow the groups' sizes.
    """
    names = sorted({group(r) for r in rows})
    cut = split([{"g": g} for g in names], fractions, seed)
    where = {item["g"]: name for name, items in cut.items() for item in items}
    out: dict[str, list[Row]] = {name: [] for name in fractions}
    for row in rows:
        out[where[group(row)]].append(row)
    return out
