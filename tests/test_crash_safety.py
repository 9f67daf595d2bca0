"""Crash anywhere, rerun finishes: `peftlab run` is SIGKILLed at deterministic points (faults.py) in
every phase, then run again; the experiment completes, nothing is half-written, and the final
metrics equal those of an uninterrupted run with the same seed (exactly: fp32 on the CPU).
Also: damaged checkpoints and finished runs are detected, not used; a refused write fails the run."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peftlab.config import load_experiment
from peftlab.errors import EXIT_OK, EXIT_RUN_FAILED, InputError
from peftlab.experiment import run_experiment
from peftlab.faults import ENV
from peftlab.store import CHECKPOINT_RECORD, ExperimentDir, RunDir, read_json
from tests.conftest import tiny_experiment, write_experiment

RUNS = ("lora", "ia3")


def experiment(tmp_path: Path) -> Path:
    # 48 training rows, batch 8: 6 steps an epoch, 12 in all; a checkpoint every 4 steps
    exp = tiny_experiment(
        tmp_path,
        methods={"lora": {"r": 2, "dropout": 0.1}, "ia3": {}},
        train={"epochs": 2, "batch_size": 8, "precision": "fp32", "checkpoint_every": 4, "seed": 3},
    )
    return write_experiment(tmp_path, exp)


def rerun(path: Path) -> tuple[int, list[str]]:
    lines: list[str] = []
    return run_experiment(load_experiment(path), executor="inline", log=lines.append), lines


def results(path: Path) -> dict[str, Any]:
    """Each run's evaluation (timings left out) and the baselines: what must not depend on a crash."""
    root = load_experiment(path).runs_dir
    out: dict[str, Any] = {}
    for name in RUNS:
        metrics = read_json(root / name / "metrics.json")
        out[name] = {
            split: {k: v for k, v in scores.items() if k != "eval_seconds"} for split, scores in metrics["eval"].items()
        }
        out[name]["steps"] = metrics["train"]["steps"]
    out["baselines"] = read_json(root / "_baselines" / "metrics.json")["baselines"]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = experiment(tmp_path_factory.mktemp("reference"))
    code, _ = rerun(path)
    assert code == EXIT_OK
    return results(path)


KILL_POINTS = [
    "prepare",  # data loaded, nothing written
    "baselines",  # untrained model scored, baselines not written
    "train_step:3",  # inside the first epoch, before the first checkpoint: a fresh start
    "forward:5",  # inside the fifth training step: after its forward pass, before backward
    "train_step:6",  # after checkpoint-4: resumed mid-epoch
    "checkpoint:2",  # checkpoint-8's files written, its record not: falls back to checkpoint-4
    "write:history.jsonl:2",  # inside an atomic write (temp file written, not renamed)
    "eval:2",  # evaluating the second split
    "write:validation.jsonl",  # writing predictions
    "adapter",  # adapter saved, metrics not written
    "metrics",  # metrics written, status not done
    "done",  # the first run done, the second not started
    "train_step:16",  # inside the second run (12 steps a run)
    "report",  # every run done, the report not written
    "write:report.html",  # inside the report's atomic write
]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_anywhere_a_rerun_finishes_with_identical_results(tmp_path: Path, reference, point: str) -> None:
    path = experiment(tmp_path)
    killed = subprocess.run(
        [sys.executable, "-m", "peftlab", "run", str(path), "--executor", "inline"],
        env={**os.environ, ENV: point},
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, f"never reached kill point {point}: {killed.stderr[-2000:]}"
    code, lines = rerun(path)
    assert code == EXIT_OK, lines
    assert results(path) == reference
    root = load_experiment(path).runs_dir
    assert not list(root.rglob("*.tmp")), "temp files of the killed writes were left"
    for name in RUNS:
        run = RunDir(root / name)
        assert run.status()["state"] == "done" and run.damage() is None
        assert (run.adapter_dir / "adapter_model.safetensors").exists() and not run.checkpoints_dir.exists()
    assert (root / "report.html").exists() and (root / "results.csv").exists()


def test_a_damaged_checkpoint_is_skipped_and_the_previous_one_used(tmp_path: Path) -> None:
    path = experiment(tmp_path)
    killed = subprocess.run(
        [sys.executable, "-m", "peftlab", "run", str(path), "--executor", "inline"],
        env={**os.environ, ENV: "train_step:10"},  # after checkpoint-4 and checkpoint-8 of the first run
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL
    checkpoints = load_experiment(path).runs_dir / "lora" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4", "checkpoint-8"]
    weights = next((checkpoints / "checkpoint-8").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    code, lines = rerun(path)
    assert code == EXIT_OK
    assert any("checkpoint-8 is incomplete or damaged" in line for line in lines)
    assert any("[lora] resuming from checkpoint-4" in line for line in lines)
    assert (checkpoints / "checkpoint-4" / CHECKPOINT_RECORD).exists() is False  # spent: removed at the end


def test_a_damaged_finished_run_is_reported_and_retrained_only_with_fresh(tmp_path: Path, reference) -> None:
    path = experiment(tmp_path)
    assert rerun(path)[0] == EXIT_OK
    root = load_experiment(path).runs_dir
    predictions = root / "lora" / "predictions" / "test.jsonl"
    predictions.write_text(predictions.read_text()[:-40])  # cut short
    assert "predictions/test.jsonl has" in (RunDir(root / "lora").damage() or "")
    from peftlab.report import build_report

    build_report(root)
    report = (root / "report.md").read_text()
    assert "## Damaged runs" in report and "lora: damaged (predictions/test.jsonl has" in report
    assert list(ExperimentDir(root).damaged()) == ["lora"]
    with pytest.raises(InputError, match=r"damaged \(predictions/test.jsonl .*retrain it with --fresh lora"):
        rerun(path)
    lines: list[str] = []
    code = run_experiment(load_experiment(path), executor="inline", fresh=["lora"], log=lines.append)
    assert code == EXIT_OK and any("[ia3] done already: skipped" in line for line in lines)
    assert results(path) == reference and ExperimentDir(root).damaged() == {}


def limit_file_size() -> None:
    """In the child: files may grow to 200 KB (JSON and YAML fit; a checkpoint of the tiny model does not)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_a_refused_write_fails_the_run_with_advice_and_keeps_earlier_files(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path, methods={"full": {}}, train={"epochs": 1, "batch_size": 8, "precision": "fp32"})
    exp["evaluate"] = {"baselines": False}
    path = write_experiment(tmp_path, exp)
    result = subprocess.run(
        [sys.executable, "-m", "peftlab", "run", str(path), "--executor", "inline"],
        preexec_fn=limit_file_size,
        capture_output=True,
        text=True,
    )
    assert result.returncode == EXIT_RUN_FAILED, result.stderr[-2000:]
    run = RunDir(tmp_path / "runs" / "tiny" / "full")
    status = run.status()
    assert status["state"] == "failed"
    assert "File too large" in status["error"] and "raise it, then run again" in status["error"]
    assert run.config()["method"] == "full"  # written before: intact
    assert not list(run.path.rglob("*.tmp"))


def test_status_json_of_a_killed_writer_is_never_half_written(tmp_path: Path) -> None:
    path = experiment(tmp_path)
    killed = subprocess.run(
        [sys.executable, "-m", "peftlab", "run", str(path), "--executor", "inline"],
        env={**os.environ, ENV: "write:status.json:2"},
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL
    status = json.loads((load_experiment(path).runs_dir / "lora" / "status.json").read_text())
    assert status["state"] == "running"  # the old content, whole; the new one never replaced it
