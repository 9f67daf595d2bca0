"""Multiple choice: SWAG and list formats, encoding, collator, cue baselines, the offline set's builder, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset, DatasetDict

from peftlab.data.continuations import build_items, check_cues, cut
from peftlab.data.cues import cue_baselines, final_mark
from peftlab.errors import InputError
from peftlab.models import ModelSource, load_tokenizer
from peftlab.tasks.multiple_choice import MultipleChoice


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSource(kind="random", ref="bert", arch="bert"))


def swag_rows(n: int = 3, **changes) -> Dataset:
    rows = [
        {
            "id": f"q{i}",
            "sent1": "the man opened the door",
            "sent2": "he",
            "ending0": "walked in .",
            "ending1": "sang a song about the river .",
            "ending2": "left .",
            "ending3": "ate the car .",
            "label": i % 4,
            **changes,
        }
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def test_swag_format_and_list_format_give_the_same_items() -> None:
    swag = MultipleChoice().prepare(DatasetDict({"train": swag_rows()}), "swag")["train"]
    listed = Dataset.from_list(
        [
            {"id": r["id"], "context": r["context"], "start": r["start"], "endings": r["endings"], "label": r["label"]}
            for r in swag
        ]
    )
    task = MultipleChoice()
    again = task.prepare(DatasetDict({"train": listed}), "list")["train"]
    assert (
        swag[1]
        == again[1]
        == {
            "id": "q1",
            "context": "the man opened the door",
            "start": "he",
            "endings": ["walked in .", "sang a song about the river .", "left .", "ate the car ."],
            "label": 1,
        }
    )
    assert task.num_choices == 4


def test_featurize_pairs_truncation_count_and_collator(tokenizer) -> None:
    task = MultipleChoice()
    examples = task.prepare(DatasetDict({"train": swag_rows(2)}), "swag")["train"]
    features = task.featurize(examples, tokenizer, max_length=11)
    first = features[0]
    assert len(first["input_ids"]) == 4 and first["labels"] == 0
    # [CLS] the man opened the door [SEP] he walked in . [SEP] = 12 tokens > 11 -> truncated
    assert tokenizer.decode(first["input_ids"][2]) == "[CLS] the man opened the door [SEP] he left. [SEP]"
    assert first["truncated"] is True
    batch = task.collator(tokenizer)([dict(f) for f in task.model_inputs(features)])
    assert tuple(batch["input_ids"].shape) == (2, 4, 11) and batch["labels"].tolist() == [0, 1]
    unlabelled = task.model_inputs(features).remove_columns("labels")
    assert "labels" not in task.collator(tokenizer)([dict(f) for f in unlabelled])


def test_predict_and_score(tokenizer) -> None:
    task = MultipleChoice()
    examples = task.prepare(DatasetDict({"train": swag_rows(2)}), "swag")["train"]
    features = task.featurize(examples, tokenizer, 64)
    logits = np.array([[3.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    predictions = task.predict(logits, examples, features)
    assert [p["prediction"] for p in predictions] == [0, 0]
    assert task.score(predictions) == {"accuracy": 0.5, "n": 2, "n_truncated": 0}


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (swag_rows(1, label=4), r"item q0 \(row 1\): label 4 is out of range: expected 0\.\.3"),
        (swag_rows(1, label="x"), r"item q0 \(row 1\): label 'x' is not an ending index"),
        (swag_rows(1, ending2=""), r"item q0 \(row 1\): endings must be a list of non-empty texts"),
        (
            Dataset.from_list(
                [
                    {"id": "a", "context": "c", "endings": ["x", "y", "z"], "label": 0},
                    {"id": "b", "context": "c", "endings": ["x", "y"], "label": 0},
                ]
            ),
            r"item b \(row 2\): 2 endings, but items have 3",
        ),
        (Dataset.from_list([{"id": "a", "text": "c", "endings": ["x", "y"], "label": 0}]), "no 'context' or 'sent1'"),
    ],
)
def test_bad_items_name_the_item(rows: Dataset, expected: str) -> None:
    with pytest.raises(InputError, match=expected):
        MultipleChoice().prepare(DatasetDict({"train": rows}), "f.jsonl [train]")


def item(endings: list[str], label: int, context: str = "the film is long") -> dict:
    return {"id": str(len(endings)), "context": context, "start": "", "endings": endings, "label": label}


def accuracy(predict, rows: list[dict]) -> float:
    predictions = predict(Dataset.from_list(rows))
    return sum(p["prediction"] == p["label"] for p in predictions) / len(predictions)


def test_cue_baselines_find_a_cue_and_score_chance_without_one() -> None:
    longest_wins = [item(["a b c d e f", "a b", "a b c", "a"], 0), item(["x", "x y z w v", "x y", "x"], 1)]
    baselines = cue_baselines(Dataset.from_list(longest_wins))
    assert accuracy(baselines["cue: longest ending"], longest_wins) == 1.0
    assert accuracy(baselines["most frequent position"], longest_wins) == 0.5
    # all endings equally long, same mark, no overlap: ties are broken at random -> about chance
    flat = [item(["p q .", "r s .", "t u .", "v w ."], i % 4) for i in range(400)]
    fitted = cue_baselines(Dataset.from_list(flat))
    for name in ("cue: final punctuation", next(n for n in fitted if "ending" in n)):
        assert abs(accuracy(fitted[name], flat) - 0.25) < 0.06, name
    marks = [item(["done!", "done.", "done.", "done."], 0), item(["ok.", "ok.", "ok!", "ok."], 2)]
    assert accuracy(cue_baselines(Dataset.from_list(marks))["cue: final punctuation"], marks) == 1.0
    assert [final_mark(t) for t in ("a.", "a!", "a?", "a", "a)")] == [".", "!", "?", "w", "p"]


def test_cut_takes_the_usable_boundary_nearest_the_middle() -> None:
    text = "Although it's a bit smug and repetitive, this documentary engages your brain in a way few films do."
    assert cut(text) == (
        "Although it's a bit smug and repetitive,",
        "this documentary engages your brain in a way few films do.",
        ",",
    )
    assert cut("Too short, to cut.") is None


def test_build_items_is_deterministic_and_splits_by_film() -> None:
    rng = np.random.default_rng(1)
    words = "good bad film story actor plot scene score music light dark long short funny sad".split()  # noqa: SIM905
    snippets = [
        {
            "id": str(i),
            "text": f"The {words[i % 15]} {' '.join(rng.choice(words, 3))} part, "
            f"and the {' '.join(rng.choice(words, int(rng.integers(3, 7))))} ending works.",
            "group": f"film{i % 12}",
        }
        for i in range(240)
    ]
    fractions = {"train": 0.5, "validation": 0.25, "test": 0.25}
    first, stats = build_items(snippets, fractions, seed=0)
    again, _ = build_items(snippets, fractions, seed=0)
    assert first == again and stats["groups_per_split"] == {"train": 6, "validation": 3, "test": 3}
    films = {name: {i["movie"] for i in items} for name, items in first.items()}
    assert not films["train"] & films["test"] and not films["train"] & films["validation"]
    for items in first.values():
        for it in items:
            assert len(it["endings"]) == 4 and len(set(it["endings"])) == 4
            assert it["context"].endswith(",")


def test_check_cues_fails_a_set_whose_answer_a_cue_gives_away() -> None:
    fair = [item(["p q .", "r s .", "t u .", "v w ."], i % 4) for i in range(400)]
    assert max(check_cues({"train": fair, "test": fair})["most frequent position"].values()) == 0.25
    cued = [item(["p q r s t .", "r .", "t .", "v ."], 0)] * 40
    with pytest.raises(RuntimeError, match="a surface cue gives the answer away"):
        check_cues({"train": cued, "test": cued})
