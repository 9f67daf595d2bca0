"""`data.sources`: several datasets with their own fields and labels merged into one label set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.config import DataSpec, load_experiment
from peftlab.data.loading import load_splits
from peftlab.errors import InputError
from tests.conftest import DATA, tiny_experiment, write_experiment

STARS = {"1": "negative", "2": "negative", "3": "neutral", "4": "positive", "5": "positive"}


def reviews(folder: Path, n: int = 10) -> Path:
    """A second source with other field names and 1-5 star labels (integers)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("test", n // 2)):
        rows = [{"review": f"review number {i} of {split}", "stars": i % 5 + 1, "extra": i} for i in range(count)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def spec(tmp_path: Path, **second) -> DataSpec:
    stars = {"source": str(reviews(tmp_path / "reviews")), "fields": {"review": "text", "stars": "label"}}
    return DataSpec(sources=[{"source": str(DATA / "tiny_cls")}, {**stars, "label_map": STARS, **second}])


def test_sources_merge_with_renamed_fields_mapped_labels_ids_and_source(tmp_path: Path) -> None:
    splits = load_splits(spec(tmp_path), tmp_path)
    train = splits["train"]
    # tiny_cls: 48 train rows; reviews: 10 train rows less the 1 carved into validation (10%)
    assert len(train) == 48 + 9 and len(splits["test"]) == 12 + 5
    assert set(train.column_names) == {"id", "text", "label", "source"}  # only the fields every source has
    rows = [r for r in train if r["source"] == "reviews"]
    assert {r["label"] for r in rows} <= {"negative", "neutral", "positive"}
    first = next(r for r in splits["test"] if r["source"] == "reviews")
    assert first == {"id": "reviews/0", "text": "review number 0 of test", "label": "negative", "source": "reviews"}
    assert all(r["id"].startswith("tiny_cls/ex") for r in train if r["source"] == "tiny_cls")


def test_a_label_mapped_to_null_drops_its_examples(tmp_path: Path) -> None:
    splits = load_splits(spec(tmp_path, label_map={**STARS, "3": None}), tmp_path)
    assert not [r for r in splits["test"] if r["source"] == "reviews" and r["label"] == "neutral"]
    assert sum(r["source"] == "reviews" for r in splits["test"]) == 4  # 5 test reviews, one with 3 stars


def test_unmapped_label_and_unknown_field_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"data.sources.1 \(reviews\) \[train\]: label_map has no entry for '5'"):
        load_splits(spec(tmp_path, label_map={k: v for k, v in STARS.items() if k != "5"}), tmp_path)
    with pytest.raises(InputError, match=r"fields: no field 'body'"):
        load_splits(spec(tmp_path, fields={"body": "text"}), tmp_path)


def test_per_source_limits_apply_before_merging(tmp_path: Path) -> None:
    splits = load_splits(spec(tmp_path, limits={"test": 2}), tmp_path)
    assert sum(r["source"] == "reviews" for r in splits["test"]) == 2
    with pytest.raises(InputError, match=r"limits.test: 9 is larger than the 5 examples"):
        load_splits(spec(tmp_path, limits={"test": 9}), tmp_path)


def test_source_and_sources_together_or_neither_are_config_errors(tmp_path: Path) -> None:
    both = {"source": str(DATA / "tiny_cls"), "sources": [{"source": str(DATA / "tiny_cls")}]}
    with pytest.raises(InputError, match="either `sources` or `source`"):
        load_experiment(write_experiment(tmp_path, tiny_experiment(tmp_path, data=both)))
    twice = {"sources": [{"source": str(DATA / "tiny_cls")}, {"source": str(DATA / "tiny_cls")}]}
    with pytest.raises(InputError, match="sources named alike: tiny_cls"):
        load_experiment(write_experiment(tmp_path, tiny_experiment(tmp_path, data=twice)))


def test_set_reaches_into_the_sources_list(tmp_path: Path) -> None:
    data = {"sources": [{"source": str(DATA / "tiny_cls")}, {"source": "x", "name": "other"}]}
    exp = load_experiment(
        write_experiment(tmp_path, tiny_experiment(tmp_path, data=data)), ["data.sources.1.limits.train=7"]
    )
    assert exp.spec.data.sources[1].limits == {"train": 7}
    with pytest.raises(InputError, match="'5' is not an index of a list of 2 items"):
        load_experiment(write_experiment(tmp_path, tiny_experiment(tmp_path, data=data)), ["data.sources.5.name=z"])
