"""Multi-model / multi-task experiments: config forms, run names, --only, early stopping, the report, plan."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from peftlab.config import load_experiment
from peftlab.errors import EXIT_OK, InputError
from peftlab.experiment import run_experiment
from peftlab.plan import plan_experiment
from tests.conftest import DATA, TINY_BERT, write_experiment

CONFIGS = Path(__file__).parents[1] / "configs" / "papers"


def multitask(tmp_path: Path, **changes) -> dict:
    exp = {
        "name": "multi",
        "models": {"tiny": TINY_BERT},
        "tasks": [
            {"key": "wnut", "task": "ner", "data": {"source": str(DATA / "tiny_ner"), "max_length": 32}},
            {"task": "multiple_choice", "data": {"source": str(DATA / "tiny_mc"), "max_length": 24}},
            {"key": "sentiment", "task": "classification", "data": {"source": str(DATA / "tiny_cls")}},
        ],
        "methods": {"full": {}, "lora": {"r": 4}},
        "train": {"epochs": 1, "batch_size": 16, "precision": "fp32"},
        "output_dir": str(tmp_path / "runs"),
    }
    exp.update(changes)
    return exp


def load(tmp_path: Path, exp: dict, **kw):
    return load_experiment(write_experiment(tmp_path, exp), **kw)


def test_runs_are_model_task_method_with_task_train_overrides(tmp_path: Path) -> None:
    exp = multitask(tmp_path)
    exp["models"]["small"] = TINY_BERT
    exp["tasks"][1]["train"] = {"epochs": 3}
    loaded = load(tmp_path, exp)
    names = [r.name for r in loaded.runs]
    assert names[:6] == [
        "tiny.wnut.full",
        "tiny.wnut.lora",
        "tiny.multiple_choice.full",
        "tiny.multiple_choice.lora",
        "tiny.sentiment.full",
        "tiny.sentiment.lora",
    ]
    assert len(names) == 12 and loaded.task is None and len(loaded.groups()) == 6
    epochs = {r.name: r.train.epochs for r in loaded.runs}
    assert epochs["small.multiple_choice.lora"] == 3 and epochs["small.wnut.lora"] == 1
    assert loaded.runs[1].group == {"model": "tiny", "task": "wnut", "method": "lora"}
    assert len(load(tmp_path, exp, only=["lora"]).runs) == 6  # a method entry, model key or task key selects
    only = load(tmp_path, exp, only=["small.wnut.full", "sentiment"])
    assert [r.name for r in only.runs] == [
        "tiny.sentiment.full",
        "tiny.sentiment.lora",
        "small.wnut.full",
        "small.sentiment.full",
        "small.sentiment.lora",
    ]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"model": TINY_BERT}, "models: give either `model:` (one model) or `models:`"),
        ({"models": None}, "model: required key is missing (or `models:` for several models)"),
        ({"task": "ner"}, "task: with `tasks:` each task entry has its own task"),
        ({"tasks": None}, "task: required key is missing (or `tasks:`"),
        ({"models": {"a.b": TINY_BERT}}, "model key 'a.b' may use only letters"),
    ],
)
def test_form_errors(tmp_path: Path, change: dict, expected: str) -> None:
    exp = multitask(tmp_path)
    exp.update(change)
    exp = {k: v for k, v in exp.items() if v is not None}
    with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load(tmp_path, exp)


def test_entry_errors_name_the_task_entry(tmp_path: Path) -> None:
    exp = multitask(tmp_path)
    exp["tasks"][1]["task"] = {"name": "ner", "lables": ["O"]}
    exp["tasks"][2]["key"] = "wnut"
    exp["tasks"][1]["train"] = {"early_stopping": {"patience": 2}, "checkpoint_every": 10}
    with pytest.raises(InputError) as info:
        load(tmp_path, exp, only=["nope"])
    message = str(info.value)
    assert "tasks.1.task.lables: unknown key (did you mean 'labels'?)" in message
    assert "tasks.2.key: task key 'wnut' is used twice" in message
    assert "tasks.1.train: Value error, early_stopping evaluates" in message
    assert "--only nope: no such run" in message


def test_early_stopping_metric_must_be_one_the_task_reports(tmp_path: Path) -> None:
    exp = multitask(tmp_path, train={"epochs": 1, "early_stopping": {"metric": "bleu"}, "precision": "fp32"})
    from peftlab.experiment import prepare

    with pytest.raises(InputError, match="'bleu' is not a validation metric of this task; expected one of: auto, loss"):
        prepare(load(tmp_path, exp).groups()[0], log=lambda m: None)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("multi")
    exp = multitask(tmp_path)
    # NER: early stopping on the loss with a min_delta no epoch can reach -> stops after epoch 1 + patience 1
    exp["tasks"][0]["train"] = {"epochs": 4, "early_stopping": {"patience": 1, "metric": "loss", "min_delta": 10}}
    squad = str(DATA / "squad_tiny.json")
    exp["tasks"].append(
        {
            "key": "squad",
            "task": {"name": "qa", "doc_stride": 16},
            "data": {
                "source": "squad",
                "files": dict.fromkeys(("train", "validation", "test"), squad),
                "max_length": 48,
            },
        }
    )
    lines: list[str] = []
    code = run_experiment(load(tmp_path, exp), executor="inline", log=lines.append)
    assert code == EXIT_OK, lines
    return tmp_path / "runs" / "multi"


def test_early_stopping_stops_keeps_the_best_epoch_and_is_recorded(finished: Path) -> None:
    metrics = json.loads((finished / "tiny.wnut.lora" / "metrics.json").read_text())
    stop = metrics["train"]["early_stopping"]
    assert metrics["train"]["epochs"] == 2.0 and metrics["train"]["max_epochs"] == 4
    assert stop["stopped_early"] is True and stop["metric"] == "loss" and stop["stopped_at_epoch"] == 2.0
    lines = (finished / "tiny.wnut.lora" / "history.jsonl").read_text().splitlines()
    history = [h for h in map(json.loads, lines) if h["kind"] == "epoch"]  # step rows: the loss every few steps
    assert {"eval_f1", "eval_token_accuracy", "val_loss"} <= set(history[0])
    # the weights kept are the epoch with the lowest validation loss (min_delta only decides when to stop)
    best = min(history, key=lambda h: h["val_loss"])
    assert stop["best_epoch"] == best["epoch"] and stop["best_value"] == pytest.approx(best["val_loss"])
    assert "early_stopping" not in json.loads((finished / "tiny.sentiment.lora" / "metrics.json").read_text())["train"]


def test_report_has_the_study_tables(finished: Path) -> None:
    md = (finished / "report.md").read_text()
    assert "| Model & method | Trainable params | wnut token_accuracy | wnut f1 | multiple_choice accuracy |" in md
    assert "| tiny (full) | 0.10M |" in md and "| baseline: cue: final punctuation | — | — | — |" in md
    assert "## PEFT against full fine-tuning" in md and "| tiny (lora) | wnut | f1 |" in md
    assert "### Training time: multiple_choice" in md
    assert "| tiny (lora) | CPU: " in md and re.search(r"2 of 4 \(stopped early; best epoch \d\)", md)
    assert "## Early stopping" in md and "## Task wnut: all results" in md
    rows = list(csv.DictReader((finished / "results.csv").open()))
    lora = next(r for r in rows if r["run"] == "tiny.wnut.lora")
    assert (lora["model"], lora["task"], lora["method"], lora["stopped_early"]) == ("tiny", "wnut", "lora", "True")
    assert {r["task"] for r in rows if r["kind"] == "baseline"} == {"wnut", "multiple_choice", "sentiment", "squad"}
    full, lora_mc = (
        json.loads((finished / f"tiny.multiple_choice.{m}" / "metrics.json").read_text()) for m in ("full", "lora")
    )
    share = lora_mc["params"]["trainable"] / full["params"]["trainable"]
    assert f"| {100 * share:.2f} |" in md


def test_shares_of_a_reference_no_better_than_baselines_are_marked_and_not_counted(finished: Path) -> None:
    """A tiny model's full fine-tuning ties the majority class on sentiment: its share is no evidence."""
    md = (finished / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| tiny (lora) | sentiment | accuracy |"))
    assert row.split(" | ")[5].endswith("†")
    assert "tiny sentiment accuracy: 50.0 against majority class 50.0" in md
    # every tiny reference is at baseline level here, so nothing is counted for or against the claim
    assert "PEFT run(s) reach" not in md and "the study's claim cannot be judged" in md


def test_qa_scores_already_x100_are_not_scaled_again(finished: Path) -> None:
    """QA reports EM/F1 x100 itself; the cross-task table puts every task on one x100 scale."""
    md = (finished / "report.md").read_text()
    f1 = json.loads((finished / "tiny.squad.lora" / "metrics.json").read_text())["eval"]["test"]["f1"]
    row = next(line for line in md.splitlines() if line.startswith("| tiny (lora) |"))  # the summary table
    assert "squad f1" in md and f"| {f1:.1f} |" in row
    assert all(float(c) <= 100 for c in re.findall(r"\| (\d+\.\d) ", row))


def test_reloaded_multitask_runs_predict_as_saved(finished: Path) -> None:
    from peftlab.store import read_jsonl
    from peftlab.trained import load_run

    for run in ("tiny.wnut.lora", "tiny.multiple_choice.full", "tiny.multiple_choice.lora"):
        saved = read_jsonl(finished / run / "predictions" / "test.jsonl")
        trained = load_run(finished / run)
        from datasets import Dataset

        keys = ("id", "tokens", "tags") if "wnut" in run else ("id", "context", "endings", "label")
        examples = Dataset.from_list(
            [{k: r[k] for k in keys} | ({"start": ""} if "wnut" not in run else {}) for r in saved]
        )
        assert [p["prediction"] for p in trained.predict(examples)] == [p["prediction"] for p in saved]


def test_worker_processes_train_the_runs_of_several_models(tmp_path: Path) -> None:
    """models: with one task/data, through the process executor (each worker prepares only its group)."""
    exp = multitask(tmp_path, models={"a": TINY_BERT, "b": TINY_BERT}, methods={"lora": {"r": 2}})
    exp["task"], exp["data"] = "multiple_choice", {"source": str(DATA / "tiny_mc"), "max_length": 24}
    del exp["tasks"]
    exp["evaluate"] = {"baselines": False}
    lines: list[str] = []
    code = run_experiment(load(tmp_path, exp), executor="process", log=lines.append)
    root = tmp_path / "runs" / "multi"
    assert code == EXIT_OK, lines
    for run in ("a.lora", "b.lora"):
        assert json.loads((root / run / "status.json").read_text())["state"] == "done"
    md = (root / "report.md").read_text()
    assert "| Model & method | Trainable params | multiple_choice accuracy |" in md and "| b (lora) |" in md


def test_plan_on_the_paper_config_gives_the_study_counts() -> None:
    rows = {
        r.run: r for r in plan_experiment(load_experiment(CONFIGS / "lora_multitask_bert.yaml"), log=lambda m: None)
    }
    # LoRA r=8 on q/v: 2 x r x 768 x 2 per layer -> DistilBERT 6 layers 147,456; BERT-base 12 layers 294,912
    ner_head = 768 * 13 + 13
    assert rows["distilbert.wnut17.lora"].trainable == 147_456 + ner_head  # about 0.15M (the study: 0.15M)
    assert rows["bert.wnut17.lora"].trainable == 294_912 + ner_head  # about 0.3M (the study: 0.3M)
    assert rows["bert.swag.lora"].trainable == 294_912 + 768 + 1
    assert rows["distilbert.swag.lora"].trainable == 147_456 + 768 * 768 + 768 + 768 + 1  # + pre_classifier
    assert rows["bert.wnut17.full"].trainable == 108_891_648 + ner_head  # BERT-base 110M (the study: 110M)
    assert rows["bert.wnut17.lora"].lr == 5e-5
    assert rows["distilbert.squad.lora"].trainable == 147_456 + 768 * 2 + 2  # the span head
    assert rows["bert.squad.lora"].trainable == 294_912 + 768 * 2 + 2


def test_offline_config_validates() -> None:
    exp = load_experiment(CONFIGS / "lora_multitask_offline.yaml")
    assert [g.group_name for g in exp.groups()] == ["minilm.wnut16", "minilm.mc", "minilm.qa", "minilm.sentiment"]
    assert exp.groups()[0].runs[0].train.early_stopping is not None
