"""The QA task: SQuAD input formats, windows and span labels, bad input, predictions from logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from peftlab.config import DataSpec
from peftlab.data.loading import load_rows
from peftlab.errors import InputError
from peftlab.models import load_tokenizer, resolve_model
from peftlab.tasks import TASKS
from tests.conftest import DATA, TINY_BERT

SQUAD = DATA / "squad_tiny.json"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(TINY_BERT))


def task(**options):
    return TASKS.get("qa")(**options)


def squad_rows(path: Path = SQUAD) -> Dataset:
    return load_rows(DataSpec(source=str(path)), None)[0]


def test_squad_json_is_flattened_to_the_hub_layout() -> None:
    rows = squad_rows()
    assert len(rows) == 12 and set(rows.column_names) == {"id", "title", "context", "question", "answers"}
    assert rows[2]["answers"] == {
        "text": ["a new school of medicine", "school of medicine"],
        "answer_start": [240, 246],
    }
    examples = task().examples_from_rows(rows, "squad_tiny.json")
    assert examples[2]["answers"] == ["a new school of medicine", "school of medicine"]
    assert examples[2]["answer_starts"] == [240, 246]


@pytest.mark.parametrize(
    "answers",
    [
        {"text": ["Bob", "Bob."], "answer_start": [8, 8]},
        [{"text": "Bob", "answer_start": 8}, {"text": "Bob.", "answer_start": 8}],
    ],
)
def test_jsonl_with_the_same_fields(tmp_path: Path, answers) -> None:
    path = tmp_path / "qa.jsonl"
    row = {"id": "a", "question": "Whom did Ann meet?", "context": "Ann met Bob.", "answers": answers}
    path.write_text(json.dumps(row) + "\n")
    examples = task().examples_from_rows(squad_rows(path), str(path))
    assert examples["answers"] == [["Bob", "Bob."]] and examples["answer_starts"] == [[8, 8]]


def test_windows_labels_and_bookkeeping(tokenizer) -> None:
    qa = task(doc_stride=16)
    examples = qa.examples_from_rows(squad_rows(), "squad_tiny.json")
    features = qa.featurize(examples, tokenizer, 48)
    assert len(features) > len(examples)  # the long paragraphs need several windows
    assert {"example_index", "offset_start", "offset_end", "start_positions"} <= set(features.column_names)
    assert "offset_start" not in qa.model_inputs(features).column_names
    assert all(len(ids) <= 48 for ids in features["input_ids"])
    found = set()
    for f in features:
        ex = examples[f["example_index"]]
        s, e = f["start_positions"], f["end_positions"]
        if s == 0:  # the window does not hold the whole first answer: the start ([CLS]) token
            assert e == 0
            continue
        text = ex["context"][f["offset_start"][s] : f["offset_end"][e]]
        assert text == ex["answers"][0]  # the label tokens map back to exactly the answer
        found.add(f["example_index"])
    assert found == set(range(len(examples)))  # every answer sits whole in some window


def test_predict_recovers_the_answers_from_ideal_logits(tokenizer) -> None:
    qa = task(doc_stride=16)
    examples = qa.examples_from_rows(squad_rows(), "squad_tiny.json")
    features = qa.featurize(examples, tokenizer, 48)
    width = max(len(ids) for ids in features["input_ids"])
    start = np.full((len(features), width), -100.0)
    end = np.full((len(features), width), -100.0)
    rows = np.arange(len(features))
    start[rows, features["start_positions"]] = 10.0
    end[rows, features["end_positions"]] = 10.0
    predictions = qa.predict((start, end), examples, features)
    assert [p["prediction"] for p in predictions] == [a[0] for a in examples["answers"]]
    assert qa.score(predictions) == {"exact_match": 100.0, "f1": 100.0, "no_answer_pct": 0.0, "n": 12}


def test_lowercase_keeps_offsets_into_the_original_text(tokenizer) -> None:
    qa = task(lowercase=True, doc_stride=8)
    assert qa._text("İstanbul ABC") == "İstanbul abc"  # 'İ'.lower() is two characters: kept as it is
    rows = Dataset.from_list(
        [
            {
                "id": "x",
                "question": "WHO?",
                "context": "Met JOHN SMITH",
                "answers": {"text": ["JOHN SMITH"], "answer_start": [4]},
            }
        ]
    )
    examples = qa.examples_from_rows(rows, "mem")
    features = qa.featurize(examples, tokenizer, 32)
    f = features[0]
    assert examples[0]["context"][f["offset_start"][f["start_positions"]] : f["offset_end"][f["end_positions"]]] == (
        "JOHN SMITH"
    )


def bad(tmp_path: Path, **changes) -> Path:
    doc = json.loads(SQUAD.read_text())
    qa = doc["data"][0]["paragraphs"][0]["qas"][0]
    paragraph = doc["data"][0]["paragraphs"][0]
    for key, value in changes.items():
        (paragraph if key == "context" else qa)[key] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"answers": [{"text": "1836", "answer_start": 3}]}, r"example q1: answer '1836' is not at answer_start 3"),
        ({"answers": [{"text": "1836", "answer_start": "30"}]}, r"example q1\): answer_start must be a character"),
        ({"context": "   "}, r"example q1: empty or missing context"),
        ({"answers": []}, r"example q1: no answer.*SQuAD v2"),
        ({"is_impossible": True}, r"qas\[0\] \(id q1\): is_impossible is SQuAD v2"),
    ],
)
def test_bad_squad_input_names_file_and_example(tmp_path: Path, changes: dict, message: str) -> None:
    path = bad(tmp_path, **changes)
    with pytest.raises(InputError, match=message) as info:
        rows, where = load_rows(DataSpec(source=str(path)), None)
        task().examples_from_rows(rows, where)
    assert "bad.json" in str(info.value)


def test_a_file_that_is_not_squad(tmp_path: Path) -> None:
    rows, where = load_rows(DataSpec(source=str(DATA / "tiny_cls" / "test.jsonl")), None)
    with pytest.raises(InputError, match=r"test.jsonl.*no field 'question', 'context', 'answers'.*SQuAD v1.1"):
        task().examples_from_rows(rows, where)
    v2 = tmp_path / "v2.json"
    v2.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": []}]}))
    with pytest.raises(InputError, match=r"v2\.json: SQuAD version v2\.0"):
        load_rows(DataSpec(source=str(v2)), None)


def test_a_question_that_leaves_no_room_for_the_context(tokenizer) -> None:
    rows = Dataset.from_list(
        [
            {
                "id": "long-q",
                "question": "why " * 30,
                "context": "because",
                "answers": {"text": ["because"], "answer_start": [0]},
            }
        ]
    )
    examples = task(doc_stride=8).examples_from_rows(rows, "mem")
    with pytest.raises(InputError, match=r"example long-q: the question is 30 tokens; .* at most 20"):
        task(doc_stride=8).featurize(examples, tokenizer, 32)
    with pytest.raises(InputError, match=r"task.doc_stride \(40\) leaves no room"):
        task(doc_stride=40).featurize(examples, tokenizer, 32)


def test_unlabelled_examples_have_no_span_labels(tokenizer) -> None:
    rows = Dataset.from_list([{"question": "Who met Bob?", "context": "Ann met Bob."}])
    qa = task(doc_stride=8)
    examples = qa.examples_from_rows(rows, "stdin", labelled=False)
    features = qa.featurize(examples, tokenizer, 32)
    assert "start_positions" not in features.column_names and examples[0]["id"] == "0"
    assert qa.probe_answer({"prediction": ""}) == "[No answer found]"
    assert qa.probe_match({"prediction": "the Ann"}, "Ann") and not qa.probe_match({"prediction": "Bob"}, ["Ann"])


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_peft_qa_models_read_the_segments(tokenizer, method: str) -> None:
    """PEFT's QUESTION_ANS wrapper drops token_type_ids; the QA task's PEFT model must pass them on, as
    plain transformers does (BERT tells question from context by them)."""
    import torch

    from peftlab.methods import METHODS

    qa = task()
    model = qa.build_model(resolve_model(TINY_BERT), tokenizer)
    model = METHODS.get(method)().apply(model, head_modules=qa.head_modules(model), task_type=qa.peft_task_type)
    model.eval()
    ids = torch.tensor([[2, 5, 6, 3, 7, 8, 9, 3]])
    first, second = torch.zeros_like(ids), torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        a = model(input_ids=ids, token_type_ids=first).start_logits
        b = model(input_ids=ids, token_type_ids=second).start_logits
        plain = model.get_base_model()(input_ids=ids, token_type_ids=second).start_logits
    assert not torch.allclose(a, b)
    assert torch.equal(b, plain)
