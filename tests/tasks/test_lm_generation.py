"""lm_generation: answer metrics, answer-only loss, batched greedy generation on a tiny random Llama, bad input,
and one tiny experiment end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from pydantic import ValidationError

from peftlab import engine
from peftlab.config import TrainSpec, load_experiment
from peftlab.errors import EXIT_OK, InputError
from peftlab.store import read_jsonl
from peftlab.tasks import TASKS
from peftlab.tasks.causal_classification import IGNORE
from peftlab.tasks.lm_generation import answer_scores, end_token, last_number
from tests.conftest import tiny_experiment, write_experiment
from tests.tasks.test_causal_classification import TINY_LLAMA, tiny_llama_and_tokenizer

QUESTIONS = ["what colour is the sky", "who wrote the play about the prince of denmark", "how many legs has a cat"]
ANSWERS = [["blue", "light blue"], ["william shakespeare", "shakespeare"], ["4", "four"]]


def make_task(**options):
    return TASKS.get("lm_generation")(**options)


def rows(n: int = 3, **extra) -> list[dict]:
    return [{"id": f"q{i}", "question": QUESTIONS[i % 3], "answers": ANSWERS[i % 3], **extra} for i in range(n)]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama_and_tokenizer()


# --- metrics ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "answers", "numeric"),
    [
        ("The answer is 1,234.", ["1234"], True),
        ("about 12 or 13", ["13"], True),  # the last number counts
        ("about 13 or 12", ["13"], False),
        ("no number", ["5"], False),
        ("-3 degrees", ["-3"], True),
        ("pages 3-4", ["4"], True),  # a hyphen between numbers is no minus sign
        ("12,13", ["13"], True),  # "12,13" is no thousands-separated number
        ("1,2345", ["2345"], True),
        ("$2.50 each", ["2.5"], True),
    ],
)
def test_numeric_match_takes_the_last_number(prediction: str, answers: list[str], numeric: bool) -> None:
    assert answer_scores(prediction, answers)["numeric_match"] is numeric


def test_numeric_match_is_left_out_when_a_gold_answer_is_no_number() -> None:
    assert "numeric_match" not in answer_scores("12", ["12", "twelve"])
    assert last_number("no digits here") is None


def test_exact_match_f1_and_contains_against_aliases() -> None:
    paris = answer_scores("Paris, France", ["Paris"])
    assert paris["contains"] is True and paris["exact_match"] == 0.0 and paris["f1"] == pytest.approx(0.6667, abs=1e-4)
    alias = answer_scores("the Isle of Man", ["ISLE OF MAN", "Mannin"])
    assert alias["exact_match"] == 1.0 and alias["f1"] == 1.0
    second = answer_scores("Mannin.", ["ISLE OF MAN", "Mannin"])  # the best alias counts, not the first
    assert second["exact_match"] == 1.0
    assert answer_scores("Parisian food", ["Paris"])["contains"] is False  # whole words only
    assert answer_scores("anything", []) == {}


def test_score_reports_fractions_and_counts_empty_outputs() -> None:
    task = make_task()
    examples = Dataset.from_list(rows(3))
    predictions = task.predict(["Blue", "Shakespeare wrote it\nmore text", ""], examples, examples)
    assert [p["prediction"] for p in predictions] == ["Blue", "Shakespeare wrote it", ""]  # cut at the line break
    assert predictions[0]["reference"] == ANSWERS[0] and predictions[0]["exact_match"] == 1.0
    scores = task.score(predictions)
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx((1 + 2 * (1 / 3) * 1 / (1 / 3 + 1) + 0) / 3)
    assert scores["contains"] == pytest.approx(2 / 3)
    assert scores["n"] == 3 and scores["empty_outputs"] == 1
    assert "numeric_match" not in scores  # "blue" is no number
    numeric = make_task(metric="numeric")
    legs = Dataset.from_list([{"id": str(i), "question": "legs of a cat?", "answers": ["4"]} for i in range(2)])
    num = numeric.score(numeric.predict(["4 legs", "5"], legs, legs))
    assert num["numeric_match"] == pytest.approx(0.5) and numeric.primary_metric == "numeric_match"


def test_primary_metric_follows_the_option_and_the_class_keeps_a_default() -> None:
    cls = TASKS.get("lm_generation")
    assert cls.primary_metric == "exact_match" and cls.score_scale == 1.0
    assert make_task(metric="contains").primary_metric == "contains"
    assert make_task().primary_metric == "exact_match"
    assert {"exact_match", "f1", "numeric_match", "contains"} <= {k for k, v in cls.higher_is_better.items() if v}


def test_rationale_predictions_score_the_final_answer() -> None:
    task = make_task(target="rationale", metric="numeric")
    assert task.options.stop_at_newline is False and task.options.max_new_tokens == 256
    examples = Dataset.from_list([{"id": "g", "question": "q", "answers": ["52"]}])
    record = task.predict(["8 x 11 = 88.\n88 - 36 = 52.\nThe answer is 52."], examples, examples)[0]
    assert record["prediction"] == "52" and record["exact_match"] == 1.0 and record["numeric_match"] is True
    assert record["output"].startswith("8 x 11")
    fallback = task.predict(["88 - 36\nso 52 tins"], examples, examples)[0]  # no final line: the last line
    assert fallback["prediction"] == "so 52 tins" and fallback["numeric_match"] is True


def test_baseline_predicts_the_most_frequent_training_answer() -> None:
    task = make_task()
    train = Dataset.from_list([*rows(3), {"id": "x", "question": "sky?", "answers": ["blue"]}])
    predictions = task.baselines(train)["most frequent training answer"](Dataset.from_list(rows(3)))
    assert [p["prediction"] for p in predictions] == ["blue"] * 3
    assert task.score(predictions)["exact_match"] == pytest.approx(1 / 3)


# --- training rows ----------------------------------------------------------------------------


def test_labels_cover_only_the_answer_and_the_end_token(llama) -> None:
    _, tokenizer = llama
    task = make_task(prompt="question: {question} answer:")
    examples = task.prepare(DatasetDict({"train": Dataset.from_list(rows(3))}), "data")["train"]
    end = end_token(tokenizer)
    for row, answers in zip(task.featurize(examples, tokenizer, 48), ANSWERS, strict=True):
        target = [*tokenizer(" " + answers[0], add_special_tokens=False)["input_ids"], end]
        n = len(target)
        assert row["input_ids"][-n:] == target and row["labels"][-n:] == target
        assert set(row["labels"][:-n]) == {IGNORE}
        assert tokenizer.decode(row["input_ids"][:-n]).endswith("answer :")  # the whole prompt, unlabelled
    prompts = task.predict_features(examples, tokenizer, 48)
    assert [len(p) for p in prompts["input_ids"]] == [
        len(r) - len(tokenizer(" " + a[0], add_special_tokens=False)["input_ids"]) - 1
        for r, a in zip(task.featurize(examples, tokenizer, 48)["input_ids"], ANSWERS, strict=True)
    ]


def test_rationale_target_is_the_steps_then_the_answer_line(llama) -> None:
    _, tokenizer = llama
    task = make_task(target="rationale", prompt="question: {question} solution:")
    data = [{"id": "g", "question": "how many legs has a cat", "answers": ["4"], "rationale": "a cat has four legs"}]
    examples = task.prepare(DatasetDict({"train": Dataset.from_list(data)}), "data")["train"]
    row = task.featurize(examples, tokenizer, 64)[0]
    target = [*tokenizer(" a cat has four legs\nThe answer is 4.", add_special_tokens=False)["input_ids"]]
    target.append(end_token(tokenizer))
    assert row["labels"][-len(target) :] == target and set(row["labels"][: -len(target)]) == {IGNORE}
    assert row["input_ids"][-len(target) :] == target


def test_a_long_context_is_cut_but_the_question_and_answer_stay(llama) -> None:
    _, tokenizer = llama
    task = make_task(context_field="context", prompt="passage: {context} question: {question} answer:")
    data = [{**rows(1)[0], "context": "the sky was blue and the sea was green " * 30}]
    examples = task.prepare(DatasetDict({"train": Dataset.from_list(data)}), "data")["train"]
    row = task.featurize(examples, tokenizer, 40)[0]
    assert len(row["input_ids"]) <= 40
    assert "question : what colour is the sky answer : blue" in tokenizer.decode(row["input_ids"])


# --- generation -------------------------------------------------------------------------------


def _prompts(tokenizer) -> list[list[int]]:
    texts = ["the sky", "a long question about the colour of the sea and the sky today", "cat", "who wrote it", "x y"]
    return [tokenizer(t)["input_ids"][:-1] for t in texts]  # [CLS] ... without [SEP]


def _cut(ids: list[int], stops: set[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stops:
            return ids[: i + 1]
    return ids


def test_batched_generation_equals_one_at_a_time(llama) -> None:
    model, tokenizer = llama
    prompts = _prompts(tokenizer)
    pad = tokenizer.pad_token_id

    def run(batch_size: int, eos: int, **kw) -> list[list[int]]:
        ids, seconds = engine.generate(
            model, prompts, pad_id=pad, eos_ids=[eos], max_new_tokens=6, batch_size=batch_size, **kw
        )
        assert seconds > 0
        return ids

    alone = run(1, pad)
    assert run(3, pad) == alone  # batches mix prompt lengths: left padding changes nothing
    assert all(len(ids) <= 6 for ids in alone) and max(len(ids) for ids in alone) == 6
    eos = alone[1][2]  # a token the second prompt generates third: it now ends that row there
    stopped = run(3, eos)
    assert stopped == [_cut(ids, {pad, eos}) for ids in alone]
    assert stopped[1] == alone[1][:3] and stopped[1][-1] == eos
    assert any(len(ids) > 3 for ids in stopped)  # the other rows of its batch went on
    three = engine.generate(model, prompts, pad_id=pad, eos_ids=[pad], max_new_tokens=6, stop=lambda ids: len(ids) >= 3)
    assert three[0] == [ids[:3] for ids in alone]  # a stop predicate ends rows too, and order is kept
    forced, _ = engine.generate(model, prompts, pad_id=pad, eos_ids=[eos], max_new_tokens=6, min_new_tokens=6)
    assert all(len(ids) == 6 for ids in forced)
    model.train()
    engine.generate(model, prompts[:1], pad_id=pad, eos_ids=[pad], max_new_tokens=1)
    assert model.training  # the mode is restored
    model.eval()


def test_model_outputs_decode_the_generated_answers(llama) -> None:
    model, tokenizer = llama
    task = make_task(max_new_tokens=3, prompt="question: {question} answer:")
    examples = task.examples_from_rows(Dataset.from_list(rows(3)), "new.jsonl")
    features = task.predict_features(examples, tokenizer, 48)
    texts, _ = task.model_outputs(model, features, tokenizer, TrainSpec(eval_batch_size=2, lr=1e-3), "fp32")
    ids, _ = engine.generate(
        model, features["input_ids"], pad_id=tokenizer.pad_token_id, eos_ids=[end_token(tokenizer)], max_new_tokens=3
    )
    assert texts == tokenizer.batch_decode(ids, skip_special_tokens=True)
    records = task.predict(texts, examples, features)
    assert [r["id"] for r in records] == ["q0", "q1", "q2"] and all("f1" in r for r in records)


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "options", "message"),
    [
        ({"question": " "}, {}, r"example q1: empty or missing 'question'"),
        ({"answers": []}, {}, r"example q1: no answer in 'answers'"),
        ({"answers": ["paris", " "]}, {}, r"example q1: 'answers' answer 2 is empty"),
        ({"context": ""}, {"context_field": "context"}, r"example q1: empty or missing 'context'"),
        ({"answers": ["four"]}, {"metric": "numeric"}, r"example q1: 'answers': 'four' is not a number"),
        ({"rationale": " "}, {"target": "rationale"}, r"example q1: empty or missing 'rationale'"),
    ],
)
def test_bad_rows_name_the_example_and_the_key(row: dict, options: dict, message: str) -> None:
    if "context_field" in options:
        options = {**options, "prompt": "{context} {question}"}
    data = [{**r, "context": "some passage", "rationale": "worked steps"} for r in rows(3)]
    if options.get("metric") == "numeric":
        data = [{**r, "answers": ["7"]} for r in data]
    data[1].update(row)
    with pytest.raises(InputError, match=rf"^data \[train\]: {message}"):
        make_task(**options).prepare(DatasetDict({"train": Dataset.from_list(data)}), "data")


def test_squad_answers_are_read_from_their_text_list() -> None:
    squad = [
        {"id": "a", "question": "q", "context": "c", "answers": {"text": ["Levi's Stadium"], "answer_start": [1]}},
        {"id": "b", "question": "q", "context": "c", "answers": {"text": [], "answer_start": []}},
    ]
    task = make_task(context_field="context")
    assert task.examples_from_rows(Dataset.from_list(squad[:1]), "squad")[0]["answers"] == ["Levi's Stadium"]
    with pytest.raises(InputError, match=r"squad: example b: no answer in 'answers'"):
        task.examples_from_rows(Dataset.from_list(squad), "squad")
    with pytest.raises(InputError, match=r"squad: example c: 'answers' is a mapping without 'text'"):
        task.examples_from_rows(
            Dataset.from_list([{"id": "c", "question": "q", "context": "c", "answers": {}}]), "squad"
        )


def test_missing_fields_are_named_with_the_fields_present() -> None:
    data = Dataset.from_list([{"id": "1", "text": "what is it", "answers": ["x"]}])
    with pytest.raises(InputError, match=r"new.jsonl: no field 'question' \(fields: id, text, answers\)"):
        make_task().examples_from_rows(data, "new.jsonl")
    with pytest.raises(InputError, match=r"new.jsonl: no field 'context' \(fields"):
        make_task(question_field="text", context_field="context").examples_from_rows(data, "new.jsonl")
    rationale = Dataset.from_list(rows(2))
    with pytest.raises(InputError, match=r"\[train\]: no field 'rationale'"):
        make_task(target="rationale").prepare(DatasetDict({"train": rationale}), "data")
    unlabelled = make_task().examples_from_rows(Dataset.from_list([{"question": "what is it"}]), "-", labelled=False)
    assert unlabelled[0]["answers"] == [] and unlabelled[0]["id"] == "0"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prompt": "answer briefly"}, r"no \{question\} placeholder"),
        ({"prompt": "{context} {question}"}, r"uses \{context\} but task.context_field is not set"),
        ({"context_field": "context", "prompt": "{question}"}, r"no \{context\} placeholder"),
        ({"prompt": "{question} {title}"}, r"unknown placeholder \{title\}"),
        ({"max_new_tokens": 0}, r"max_new_tokens"),
        ({"max_new_tokens": -2}, r"max_new_tokens"),
    ],
)
def test_bad_options_are_validation_errors(options: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make_task(**options)


def test_bad_options_in_an_experiment_file_name_the_task(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path, model=TINY_LLAMA, task={"name": "lm_generation", "max_new_tokens": 0})
    with pytest.raises(InputError) as info:
        load_experiment(write_experiment(tmp_path, exp))
    assert any("task" in p and "max_new_tokens" in p for p in info.value.problems), info.value.problems


# --- end to end -------------------------------------------------------------------------------


def test_tiny_experiment_trains_generates_and_scores(tmp_path: Path) -> None:
    from peftlab.experiment import run_experiment

    data = tmp_path / "qa"
    data.mkdir()
    for split, n in (("train", 24), ("validation", 6), ("test", 6)):
        lines = [json.dumps({**r, "id": f"{split}-{r['id']}"}) for r in rows(n)]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    exp = tiny_experiment(
        tmp_path,
        model=TINY_LLAMA,
        task={"name": "lm_generation", "max_new_tokens": 4},
        data={"source": str(data), "max_length": 48},
        methods={"lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]}},
        train={"epochs": 1, "batch_size": 8, "precision": "fp32"},
    )
    lines: list[str] = []
    code = run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=lines.append)
    assert code == EXIT_OK, lines
    run = tmp_path / "runs" / "tiny" / "lora"
    test = json.loads((run / "metrics.json").read_text())["eval"]["test"]
    assert 0 <= test["exact_match"] <= 1 and 0 <= test["f1"] <= 1 and test["n"] == 6
    predictions = read_jsonl(run / "predictions" / "test.jsonl")
    assert len(predictions) == 6 and all(isinstance(p["prediction"], str) for p in predictions)
    assert predictions[0]["reference"] == ANSWERS[0]
    baselines = json.loads((tmp_path / "runs" / "tiny" / "_baselines" / "metrics.json").read_text())["baselines"]
    assert set(baselines) == {"most frequent training answer", "untrained model"}
    assert baselines["most frequent training answer"]["test"]["exact_match"] == pytest.approx(2 / 6)
    assert any(re.search(r"test exact_match \d", line) for line in lines), lines
