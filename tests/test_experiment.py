"""End to end on a tiny random model: runs, store layout, skip/resume, failures, reload, report."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftlab.config import load_experiment
from peftlab.errors import EXIT_OK, EXIT_RUN_FAILED, InputError
from peftlab.experiment import run_experiment
from peftlab.store import CHECKPOINT_RECORD, read_jsonl
from peftlab.trained import load_run
from tests.conftest import tiny_experiment, write_experiment


def run(tmp_path: Path, exp: dict, **kw) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=lines.append, **kw)
    return code, lines


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[str]]:
    tmp_path = tmp_path_factory.mktemp("finished")
    exp = tiny_experiment(tmp_path)
    code, lines = run(tmp_path, exp)
    assert code == EXIT_OK, lines
    return tmp_path, exp, lines


def test_layout_metrics_and_history(finished) -> None:
    tmp_path, _, _ = finished
    root = tmp_path / "runs" / "tiny"
    for name in ("experiment.yaml", "data.json", "report.md", "report.html", "results.csv"):
        assert (root / name).is_file(), name
    for run_name in ("full", "lora", "ia3"):
        folder = root / run_name
        assert json.loads((folder / "status.json").read_text())["state"] == "done"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["train"]["epochs"] == 2 and metrics["train"]["steps"] == 12  # 48 examples / 8 x 2 epochs
        assert metrics["train"]["samples_per_second"] > 0 and metrics["train"]["tokens_per_second"] > 0
        assert metrics["memory"]["peak_mib"] > 0 and metrics["precision"] == "fp32"
        assert metrics["eval"]["test"]["n"] == 12 and 0 <= metrics["eval"]["test"]["accuracy"] <= 1
        history = [h for h in read_jsonl(folder / "history.jsonl") if h["kind"] == "epoch"]  # + step rows
        assert [h["epoch"] for h in history] == [1.0, 2.0]
        assert all("train_loss" in h and "val_loss" in h and h["epoch_seconds"] > 0 for h in history)
        assert len(read_jsonl(folder / "predictions" / "test.jsonl")) == 12
        assert (folder / "adapter").is_dir() and not (folder / "checkpoints").exists()
    full, lora = (json.loads((root / n / "metrics.json").read_text())["params"] for n in ("full", "lora"))
    assert full["trainable_pct"] == 100 and lora["trainable"] < full["trainable"] / 10


def test_report_table_and_self_contained_html(finished) -> None:
    tmp_path, _, _ = finished
    root = tmp_path / "runs" / "tiny"
    rows = list(csv.DictReader((root / "results.csv").open()))
    assert [r["run"] for r in rows] == ["full", "lora", "ia3", "majority class", "untrained model"]
    majority = rows[3]
    # tiny_cls test split: 6 negative of 12 -> majority (train's most common label) accuracy measured, not assumed
    assert 0 < float(majority["test_accuracy"]) <= 1 and majority["kind"] == "baseline"
    html = (root / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 6 and "src='figures" not in html
    md = (root / "report.md").read_text()
    assert "| Run | Method | Trainable params |" in md and "figures/curve-lora.png" in md


def test_rerun_skips_finished_runs(finished) -> None:
    tmp_path, exp, _ = finished
    before = (tmp_path / "runs" / "tiny" / "lora" / "metrics.json").stat().st_mtime_ns
    code, lines = run(tmp_path, exp)
    assert code == EXIT_OK
    assert sum("done already: skipped" in line for line in lines) == 3
    assert not any("epoch" in line for line in lines)
    assert (tmp_path / "runs" / "tiny" / "lora" / "metrics.json").stat().st_mtime_ns == before


@pytest.mark.parametrize("run_name", ["full", "lora", "ia3"])
def test_reloaded_run_gives_exactly_the_saved_predictions(finished, run_name: str) -> None:
    tmp_path, _, _ = finished
    folder = tmp_path / "runs" / "tiny" / run_name
    saved = read_jsonl(folder / "predictions" / "test.jsonl")
    trained = load_run(folder)
    from datasets import Dataset

    examples = Dataset.from_list([{k: r[k] for k in ("id", "text", "label")} for r in saved])
    again = trained.predict(examples)
    assert [p["prediction"] for p in again] == [p["prediction"] for p in saved]
    assert [p["probs"] for p in again] == [p["probs"] for p in saved]


def test_changed_settings_refuse_then_fresh_moves_aside(tmp_path: Path) -> None:
    exp = tiny_experiment(
        tmp_path, methods={"lora": {"r": 2}}, train={"epochs": 1, "batch_size": 16, "precision": "fp32"}
    )
    assert run(tmp_path, exp)[0] == EXIT_OK
    exp["methods"]["lora"]["r"] = 3
    with pytest.raises(InputError, match=r"other settings \(settings.r\)"):
        run(tmp_path, exp)
    code, lines = run(tmp_path, exp, fresh=True)
    assert code == EXIT_OK and any("moved the old run" in line for line in lines)
    assert len(list((tmp_path / "runs" / "tiny").glob("lora.replaced-*"))) == 1


def test_failed_run_is_recorded_and_others_go_on(tmp_path: Path) -> None:
    methods = {"broken": {"method": "lora", "target_modules": ["no_such_module"]}, "ia3": {}}
    exp = tiny_experiment(tmp_path, methods=methods, train={"epochs": 1, "batch_size": 16, "precision": "fp32"})
    code, _ = run(tmp_path, exp)
    root = tmp_path / "runs" / "tiny"
    status = json.loads((root / "broken" / "status.json").read_text())
    assert code == EXIT_RUN_FAILED and status["state"] == "failed" and "No modules were targeted" in status["error"]
    assert json.loads((root / "ia3" / "status.json").read_text())["state"] == "done"
    assert "Failed runs" in (root / "report.md").read_text()


def test_limit_larger_than_data_fails_before_training(tmp_path: Path) -> None:
    exp = tiny_experiment(
        tmp_path, data={"source": tiny_experiment(tmp_path)["data"]["source"], "limits": {"train": 1000}}
    )
    with pytest.raises(InputError, match=r"data\.limits\.train: 1000 is larger than the 48 examples"):
        run(tmp_path, exp)
    assert not (tmp_path / "runs").exists()


def test_killed_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """Kill `peftlab run` (and its worker) after the first checkpoint; a second run resumes and completes."""
    exp = tiny_experiment(
        tmp_path,
        methods={"lora": {"r": 2}},
        train={"epochs": 6, "batch_size": 2, "precision": "fp32", "checkpoint_every": 10},
    )
    exp["evaluate"] = {"baselines": False}
    path = write_experiment(tmp_path, exp)
    ckpts = tmp_path / "runs" / "tiny" / "lora" / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftlab", "run", str(path)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    # Wait for a checkpoint's completion record (written last), not for the Trainer's own files: a kill
    # between the two leaves an unfinished checkpoint, which is rightly discarded rather than resumed.
    while time.time() < deadline and not any(ckpts.glob(f"checkpoint-*/{CHECKPOINT_RECORD}")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    status = json.loads((tmp_path / "runs" / "tiny" / "lora" / "status.json").read_text())
    assert status["state"] == "running", "the run finished before it could be interrupted"
    code, lines = run(tmp_path, exp)
    metrics = json.loads((tmp_path / "runs" / "tiny" / "lora" / "metrics.json").read_text())
    assert code == EXIT_OK and any("resuming from checkpoint-" in line for line in lines)
    assert metrics["train"]["resumed_from"].startswith("checkpoint-")
    assert metrics["train"]["steps"] == 6 * 48 // 2
    history = read_jsonl(tmp_path / "runs" / "tiny" / "lora" / "history.jsonl")
    assert [h["epoch"] for h in history if h["kind"] == "epoch"] == [
        1.0,
        2.0,
        3.0,
        4.0,
        5.0,
        6.0,
    ]


def test_run_ends_with_a_terminal_summary(finished) -> None:
    _, _, lines = finished
    header = next(i for i, line in enumerate(lines) if line.startswith("run ") and "test accuracy" in line)
    names = [line.split()[0] for line in lines[header + 2 : header + 5]]
    assert names == ["full", "lora", "ia3"] and lines[-1].startswith("report: ")
