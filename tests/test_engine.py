"""The training engine: a diverged run stops at once and says where and what to do."""

from __future__ import annotations

import json
from pathlib import Path

from peftlab.config import load_experiment
from peftlab.errors import EXIT_RUN_FAILED
from peftlab.experiment import run_experiment
from tests.conftest import tiny_experiment, write_experiment


def test_a_nan_loss_fails_the_run_at_once_and_the_others_go_on(tmp_path: Path) -> None:
    exp = tiny_experiment(
        tmp_path,
        train={"epochs": 3, "batch_size": 8, "precision": "fp32", "max_grad_norm": 1e30, "scheduler": "constant"},
    )
    exp["methods"] = {"full": {"train": {"lr": 1e12}}, "lora": {"r": 2}}
    exp["evaluate"] = {"baselines": False}
    lines: list[str] = []
    code = run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=lines.append)
    assert code == EXIT_RUN_FAILED
    runs = tmp_path / "runs" / "tiny"
    status = json.loads((runs / "full" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"].startswith("NonFiniteLoss: the training loss became")
    assert "learning rate 1e+12" in status["error"] and "lower train.lr" in status["error"]
    step = int(status["error"].split(" at step ")[1].split()[0])
    assert step < 3 * 6  # stopped within the first steps, not at the end of the run (6 steps an epoch)
    assert json.loads((runs / "lora" / "status.json").read_text())["state"] == "done"
