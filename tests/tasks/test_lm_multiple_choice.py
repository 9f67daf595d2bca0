"""lm_multiple_choice on a tiny random Llama: exact letter and option scores, answer-only loss, bad input, a run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from peftlab.config import TrainSpec, load_experiment
from peftlab.errors import EXIT_OK, InputError
from peftlab.store import read_jsonl
from peftlab.tasks import TASKS
from peftlab.tasks.causal_classification import IGNORE
from tests.conftest import tiny_experiment, write_experiment
from tests.tasks.test_causal_classification import TINY_LLAMA, tiny_llama_and_tokenizer

# four questions of different lengths (batches of 3 need padding), one with three options
QUESTIONS = [
    {"id": "q0", "question": "what was the movie like", "choices": ["great", "bad", "plain", "long"], "label": 0},
    {
        "id": "q1",
        "question": "the day was long and the trip was boring , so what was the day like today",
        "choices": ["a good day", "a bad day", "a new day", "the first day"],
        "label": 1,
    },
    {"id": "q2", "question": "who sang the song", "choices": ["the band", "the man", "the women"], "label": 2},
    {
        "id": "q3",
        "question": "where did the family go after school",
        "choices": ["home", "the city", "the river", "the park"],
        "label": 3,
    },
]
SUBJECTS = ["film", "travel", "music", "film"]


def make_task(**options: Any):
    return TASKS.get("lm_multiple_choice")(**options)


def examples(rows: list[dict] | None = None) -> Dataset:
    rows = rows or [{**q, "subject": s} for q, s in zip(QUESTIONS, SUBJECTS, strict=True)]
    return make_task().prepare(DatasetDict({"test": Dataset.from_list(rows)}), "data")["test"]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama_and_tokenizer()


def run_rows(task, model, tokenizer, features: Dataset, exs: Dataset) -> list[dict]:
    spec = TrainSpec(eval_batch_size=3, precision="fp32", lr=1e-3)  # batches of 3 rows: padding in every batch
    outputs, _ = task.model_outputs(model, features, tokenizer, spec, "fp32")
    return task.predict(outputs, exs, features)


def scored(task, model, tokenizer, max_length: int = 96) -> list[dict]:
    exs = examples()
    return run_rows(task, model, tokenizer, task.predict_features(exs, tokenizer, max_length), exs)


def logprobs_by_hand(model, tokenizer, prompt: str, answer_ids: list[int] | None = None) -> torch.Tensor:
    """Next-token log-probabilities after each position of prompt (+ answer), one unpadded forward pass."""
    ids = tokenizer(prompt)["input_ids"][:-1] + (answer_ids or [])  # [CLS] ... without the trailing [SEP]
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)


def letter_prompt(q: dict) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", q["choices"], strict=False))
    return (
        "Answer the following multiple choice question with the letter of the correct option.\n\n"
        f"{q['question']}\n{options}\nAnswer:"
    )


def token(tokenizer, text: str) -> list[int]:
    return tokenizer(" " + text, add_special_tokens=False)["input_ids"]


# --- scoring ----------------------------------------------------------------------------------


def test_letter_scores_are_the_hand_computed_next_token_log_probabilities(llama) -> None:
    model, tokenizer = llama
    predictions = scored(make_task(), model, tokenizer)
    for q, pred in zip(QUESTIONS, predictions, strict=True):
        last = logprobs_by_hand(model, tokenizer, letter_prompt(q))[-1]
        expected = [float(last[token(tokenizer, letter)[0]]) for letter in "ABCD"[: len(q["choices"])]]
        assert pred["scores"] == pytest.approx(expected, abs=1e-4)
        assert pred["prediction"] == "ABCD"[int(np.argmax(expected))] and pred["reference"] == "ABCD"[q["label"]]
    assert [p["subject"] for p in predictions] == SUBJECTS


def test_training_rows_score_every_letter_like_prompt_rows(llama) -> None:
    """The per-epoch validation accuracy reads featurize's rows (prompt + gold letter): the same scores."""
    model, tokenizer = llama
    task = make_task()
    expected = scored(task, model, tokenizer)
    exs = examples()
    again = run_rows(task, model, tokenizer, task.featurize(exs, tokenizer, 96), exs)
    for a, b in zip(again, expected, strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    assert task.scores_training_rows and not make_task(scoring="option").scores_training_rows


@pytest.mark.parametrize("normalize", ["chars", "tokens", "none"])
def test_option_scores_are_the_hand_computed_normalized_log_likelihoods(llama, normalize: str) -> None:
    model, tokenizer = llama
    task = make_task(scoring="option", normalize=normalize)
    features = task.predict_features(examples(), tokenizer, 96)
    assert len(features) == sum(len(q["choices"]) for q in QUESTIONS)  # one row per (question, option)
    predictions = run_rows(task, model, tokenizer, features, examples())
    for q, pred in zip(QUESTIONS, predictions, strict=True):
        prompt = f"Question: {q['question']}\nAnswer:"
        expected = []
        for option in q["choices"]:
            answer = token(tokenizer, option)
            logprobs = logprobs_by_hand(model, tokenizer, prompt, answer)
            start = len(logprobs) - len(answer) - 1
            total = sum(float(logprobs[start + j, t]) for j, t in enumerate(answer))
            expected.append(total / {"chars": len(option), "tokens": len(answer), "none": 1}[normalize])
        assert pred["scores"] == pytest.approx(expected, abs=1e-4)
        assert pred["prediction_index"] == int(np.argmax(expected))


def test_a_three_option_item_never_predicts_d(llama) -> None:
    _, tokenizer = llama
    task = make_task()
    exs = examples()
    features = task.predict_features(exs, tokenizer, 96)
    outputs = np.tile([0.0, -1.0, -2.0, 9.0], (len(exs), 1))  # D is by far the likeliest letter everywhere
    predictions = task.predict(outputs, exs, features)
    assert [p["prediction"] for p in predictions] == ["D", "D", "A", "D"]  # q2 has options A..C only
    assert len(predictions[2]["scores"]) == 3


# --- training rows ------------------------------------------------------------------------------


def test_letter_training_labels_are_ignored_except_the_answer_letter(llama) -> None:
    _, tokenizer = llama
    features = make_task().featurize(examples(), tokenizer, 96)
    for row, q in zip(features, QUESTIONS, strict=True):
        letter = token(tokenizer, "ABCD"[q["label"]])
        assert row["input_ids"][-1:] == row["labels"][-1:] == letter
        assert set(row["labels"][:-1]) == {IGNORE}
        assert row["input_ids"][:-1] == tokenizer(letter_prompt(q))["input_ids"][:-1]


def test_option_training_labels_are_ignored_except_the_gold_option(llama) -> None:
    _, tokenizer = llama
    features = make_task(scoring="option").featurize(examples(), tokenizer, 96)
    assert len(features) == len(QUESTIONS)  # the gold option only
    for row, q in zip(features, QUESTIONS, strict=True):
        answer = token(tokenizer, q["choices"][q["label"]])
        assert row["labels"][-len(answer) :] == row["input_ids"][-len(answer) :] == answer
        assert set(row["labels"][: -len(answer)]) == {IGNORE}


def test_long_questions_lose_their_start_but_the_question_options_and_answer_stay(llama) -> None:
    _, tokenizer = llama
    task = make_task()
    vignette = "the movie was great " * 40 + "which word fits"  # an exam asks its question last
    long = examples([{**QUESTIONS[0], "question": vignette, "subject": "film"}])
    row = task.featurize(long, tokenizer, 48)[0]
    assert len(row["input_ids"]) <= 48 and row["truncated"]
    text = tokenizer.decode(row["input_ids"])
    assert text.startswith("[CLS] answer the following") and text.endswith(
        "which word fits a. great b. bad c. plain d. long answer : a"
    )
    assert task.score(run_rows(task, *llama, task.predict_features(long, tokenizer, 48), long))["n_truncated"] == 1


# --- data ---------------------------------------------------------------------------------------


def test_labels_as_letters_digits_and_hellaswag_rows_are_read() -> None:
    rows = [{**q, "label": label} for q, label in zip(QUESTIONS, ["B", "2", "a", " D "], strict=True)]
    assert examples(rows)["label"] == [1, 2, 0, 3]
    hellaswag = {"id": "h1", "context": "A man sits down.", "start": "he", "endings": ["eats .", "runs ."], "label": 1}
    ex = examples([hellaswag])[0]
    assert ex == {
        "id": "h1",
        "question": "A man sits down. he",
        "options": ["eats .", "runs ."],
        "label": 1,
        "subject": None,
    }


def test_rows_without_labels_are_read_for_prediction_only() -> None:
    rows = Dataset.from_list([{"question": "who sang", "choices": ["a band", "a man"]}])
    task = make_task()
    ex = task.examples_from_rows(rows, "stdin", labelled=False)[0]
    assert ex["label"] is None and ex["id"] == "0"
    with pytest.raises(InputError, match=r"stdin: no field 'label'"):
        task.examples_from_rows(rows, "stdin")


GOOD = {"id": "ok", "question": "who sang", "choices": ["a band", "a man", "a woman"], "label": 0, "subject": "music"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"question": "  "}, r"item bad \(row 2\): empty or missing question 'question'"),
        ({"choices": ["a band", " ", "a man"]}, r"item bad \(row 2\): option B \(index 1\) of 'choices' is empty"),
        ({"choices": ["a band"]}, r"item bad \(row 2\): 'choices' has 1 option; .* at least 2"),
        ({"choices": [f"o{i}" for i in range(27)]}, r"item bad \(row 2\): 'choices' has 27 options, more than the 26"),
        ({"label": 3}, r"item bad \(row 2\): label 'label' 3 is out of range: the item has 3 options \(0..2\)"),
        ({"label": "D"}, r"item bad \(row 2\): label 'label' 'D' names no option: the item has 3 \(A..C\)"),
        ({"label": "maybe"}, r"item bad \(row 2\): label 'label' 'maybe' is not an option index"),
        ({"label": None}, r"item bad \(row 2\): missing label 'label'"),
    ],
)
def test_bad_items_name_the_file_item_row_and_key(change: dict, message: str) -> None:
    good = {**GOOD, "label": "A"} if isinstance(change.get("label"), str) else GOOD
    rows = Dataset.from_list([good, {**GOOD, **change, "id": "bad"}])
    with pytest.raises(InputError, match=r"^data/mc\.jsonl \[train\]: " + message):
        make_task().prepare(DatasetDict({"train": rows}), "data/mc.jsonl")


@pytest.mark.parametrize(
    ("options", "drop", "message"),
    [
        (
            {},
            "question",
            r"no 'question' or 'context' field \(fields: id, choices, label, subject\); set task.question",
        ),
        ({}, "choices", r"no 'choices' or 'endings' field \(fields: id, question, label, subject\); set task.choices"),
        ({}, "label", r"no field 'label' \(fields: id, question, choices, subject\); set task.label_field"),
        ({"subject_field": "topic"}, None, r"no field 'topic' \(task.subject_field\); fields: id, question"),
    ],
)
def test_missing_fields_name_the_fields_present(options: dict, drop: str | None, message: str) -> None:
    rows = Dataset.from_list([{k: v for k, v in GOOD.items() if k != drop}])
    with pytest.raises(InputError, match=r"^data/mc\.jsonl \[train\]: " + message):
        make_task(**options).prepare(DatasetDict({"train": rows}), "data/mc.jsonl")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prompt": "{options}\nAnswer:"}, r"no \{question\} placeholder"),
        ({"prompt": "{question}\nAnswer:"}, r"no \{options\} placeholder"),
        ({"prompt": "{question} {options} {answer}"}, r"unknown placeholder \{answer\}"),
        ({"scoring": "cloze"}, "letter"),
        ({"normalise": "chars"}, "normalise"),
    ],
)
def test_bad_options_are_refused_while_the_config_is_validated(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_task(**options)
    assert make_task(scoring="option", prompt="{question}").options.prompt == "{question}"  # {options}: optional


def test_letters_that_are_not_one_known_token_are_refused(tmp_path: Path) -> None:
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "d", "who", "sang"]))
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    five = examples([{**GOOD, "choices": ["a", "b", "c", "d", "e"]}])
    make_task().featurize(examples([GOOD]), tokenizer, 32)  # A..C are tokens
    with pytest.raises(InputError, match=r"task.scoring: letter: the answer letter 'E' is not one known token"):
        make_task().featurize(five, tokenizer, 32)
    assert len(make_task(scoring="option").predict_features(five, tokenizer, 32)) == 5


def test_config_validation_imports_no_heavy_library() -> None:
    code = (
        "import sys; from peftlab.tasks import TASKS; TASKS.get('lm_multiple_choice')(scoring='option'); "
        "print([m for m in ('torch', 'transformers', 'datasets') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- metrics and baselines ----------------------------------------------------------------------


def record(pred: int, label: int | None, **extra: Any) -> dict:
    ref = None if label is None else "ABCD"[label]
    return {"prediction": "ABCD"[pred], "reference": ref, "prediction_index": pred, "label": label, **extra}


def test_score_gives_accuracy_per_subject_and_letter_shares() -> None:
    records = [
        record(0, 0, subject="law"),
        record(0, 1, subject="law"),
        record(2, 2, subject="math"),
        record(0, 3, subject="math", truncated=True),
        record(1, 3, subject="math"),
        record(1, None, subject="math"),  # unlabelled: not scored
    ]
    metrics = make_task().score(records)
    assert metrics["accuracy"] == pytest.approx(2 / 5) and metrics["n"] == 5 and metrics["n_truncated"] == 1
    assert metrics["by_subject"] == {
        "law": {"accuracy": 0.5, "n": 2},
        "math": {"accuracy": pytest.approx(1 / 3), "n": 3},
    }
    assert metrics["predicted_share"] == {"A": 0.6, "B": 0.2, "C": 0.2, "D": 0.0}
    assert metrics["true_share"] == {"A": 0.2, "B": 0.2, "C": 0.2, "D": 0.4}
    assert "by_subject" not in make_task().score([record(0, 0)])


def test_baselines_predict_the_most_frequent_position_and_the_longest_option() -> None:
    train = examples([{**q, "label": 2} for q in QUESTIONS])  # C always
    test = examples(
        [
            {"id": "t0", "question": "who", "choices": ["a", "a longer one", "b", "c"], "label": 1},
            {"id": "t1", "question": "who", "choices": ["a much longer one", "b"], "label": 0},
        ]
    )
    baselines = make_task().baselines(train)
    position = baselines["most frequent position"](test)
    assert [p["prediction"] for p in position] == ["C", "A"]  # no C in a two-option item: the next most frequent
    longest = baselines["cue: longest option"](test)
    assert [p["prediction"] for p in longest] == ["B", "A"]
    assert make_task().score(longest)["accuracy"] == 1.0


# --- end to end -----------------------------------------------------------------------------------

WORDS = ["great", "bad", "plain", "long", "good", "new", "old", "small"]


def write_split(folder: Path, split: str, n: int, offset: int) -> None:
    rows = []
    for i in range(offset, offset + n):
        subject = ["film", "music"][i % 2]
        choices = [WORDS[(i + j) % len(WORDS)] for j in range(4)]
        row = {"id": f"{split}{i}", "question": f"what was the {subject} like", "choices": choices, "label": i % 4}
        rows.append({**row, "subject": subject})
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_tiny_lora_experiment_reports_test_accuracy_by_subject(tmp_path: Path) -> None:
    from peftlab.experiment import run_experiment

    data = tmp_path / "mc"
    data.mkdir()
    for split, n, offset in (("train", 24, 0), ("validation", 8, 24), ("test", 8, 32)):
        write_split(data, split, n, offset)
    exp = tiny_experiment(
        tmp_path,
        model=TINY_LLAMA,
        task={"name": "lm_multiple_choice"},
        data={"source": str(data), "max_length": 64},
        methods={"lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]}},
        train={"epochs": 1, "batch_size": 8, "precision": "fp32"},
    )
    lines: list[str] = []
    code = run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=lines.append)
    assert code == EXIT_OK, lines
    folder = tmp_path / "runs" / "tiny"
    test = json.loads((folder / "lora" / "metrics.json").read_text())["eval"]["test"]
    assert 0 <= test["accuracy"] <= 1 and test["n"] == 8
    assert set(test["by_subject"]) == {"film", "music"} and sum(s["n"] for s in test["by_subject"].values()) == 8
    assert set(test["true_share"]) == set("ABCD")
    assert 0 <= read_jsonl(folder / "lora" / "history.jsonl")[-1]["eval_accuracy"] <= 1  # letter mode: each epoch
    predictions = read_jsonl(folder / "lora" / "predictions" / "test.jsonl")
    assert {p["reference"] for p in predictions} == set("ABCD") and all(p["prediction"] in "ABCD" for p in predictions)
    baselines = json.loads((folder / "_baselines" / "metrics.json").read_text())["baselines"]
    assert {"most frequent position", "cue: longest option", "untrained model"} <= set(baselines)
    assert re.search(r"## Predicted vs true label share \(test\)", (folder / "report.md").read_text())
