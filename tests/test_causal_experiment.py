"""A causal-LM experiment end to end on a tiny random Llama: zero-shot baseline, (IA)3 and QLoRA, merged sources.

Checks the report's bias lines and per-source tables against the metrics the runs wrote, and that a
reloaded QLoRA run predicts exactly what it predicted after training.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from datasets import Dataset

from peftlab.config import load_experiment
from peftlab.errors import EXIT_OK
from peftlab.experiment import run_experiment
from peftlab.store import read_jsonl
from peftlab.trained import load_run
from tests.conftest import DATA, tiny_experiment, write_experiment
from tests.data.test_sources import STARS, reviews
from tests.tasks.test_causal_classification import ONE_TOKEN, TINY_LLAMA


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("causal")
    stars = {"source": str(reviews(tmp_path / "reviews", 20)), "fields": {"review": "text", "stars": "label"}}
    exp = tiny_experiment(
        tmp_path,
        model=TINY_LLAMA,
        task={"name": "causal_classification", "prompt": "review: {text} sentiment:", "verbalizers": ONE_TOKEN},
        data={"sources": [{"source": str(DATA / "tiny_cls")}, {**stars, "label_map": STARS}], "max_length": 32},
        methods={"ia3": {}, "qlora": {"method": "lora", "r": 2, "quantize": "nf4"}},
        train={"epochs": 1, "batch_size": 16, "grad_accum": 2, "precision": "fp32"},
    )
    lines: list[str] = []
    code = run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=lines.append)
    assert code == EXIT_OK, lines
    return tmp_path / "runs" / "tiny"


def test_runs_record_per_source_metrics_and_memory(finished: Path) -> None:
    for run in ("ia3", "qlora"):
        metrics = json.loads((finished / run / "metrics.json").read_text())
        test = metrics["eval"]["test"]
        assert set(test["by_source"]) == {"tiny_cls", "reviews"}
        assert sum(m["n"] for m in test["by_source"].values()) == test["n"] == 12 + 10
        assert metrics["memory"]["peak_mib"] > 0
        assert metrics["train"]["steps"] == 3  # 48 + 18 examples: 5 batches of 16, accumulated in pairs: ceil(5 / 2)
        history = read_jsonl(finished / run / "history.jsonl")
        assert 0 <= history[-1]["eval_accuracy"] <= 1  # the per-epoch validation metrics, from the training rows
        predictions = read_jsonl(finished / run / "predictions" / "test.jsonl")
        assert {p["source"] for p in predictions} == {"tiny_cls", "reviews"}
    data = json.loads((finished / "data.json").read_text())
    assert data["test"]["sources"] == {"reviews": 10, "tiny_cls": 12}


def test_report_shows_zero_shot_and_trained_bias_lines_and_sources(finished: Path) -> None:
    md = (finished / "report.md").read_text()
    baselines = json.loads((finished / "_baselines" / "metrics.json").read_text())["baselines"]
    zero_shot = baselines["untrained model"]["test"]
    assert "## Predicted vs true label share (test)" in md and "## Per-source results (test)" in md
    shares = ", ".join(
        f"{label} {100 * zero_shot['predicted_share'][label]:.1f}% (true {100 * zero_shot['true_share'][label]:.1f}%)"
        for label in ("negative", "neutral", "positive")
    )
    assert f"untrained model: predicts {shares};" in md
    for run in ("ia3", "qlora"):
        assert f"\n{run}: predicts negative " in md
    accuracy = zero_shot["by_source"]["reviews"]["accuracy"]
    assert any(line.startswith("| untrained model |") and f"{accuracy:.4f}" in line for line in md.splitlines())
    assert "figures/confusion-untrained-model-test.png" in md and "figures/confusion-qlora-test.png" in md
    rows = {r["run"]: r for r in csv.DictReader((finished / "results.csv").open())}
    assert float(rows["qlora"]["peak_memory_mib"]) > 0 and rows["qlora"]["trainable_params"]


def test_reloaded_qlora_run_predicts_exactly_as_after_training(finished: Path) -> None:
    saved = read_jsonl(finished / "qlora" / "predictions" / "test.jsonl")
    examples = Dataset.from_list([{k: r[k] for k in ("id", "text", "label")} for r in saved])
    again = load_run(finished / "qlora").predict(examples)
    assert [p["loglik"] for p in again] == [p["loglik"] for p in saved]
