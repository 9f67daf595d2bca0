"""history.jsonl: the training loss every few steps (step rows) beside the per-epoch rows, exact epoch
means, one progress line an epoch, and readers that keep working on epoch rows (old files too)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from torch import nn

from peftlab import engine
from peftlab.config import TrainSpec
from peftlab.report.plots import curve_series, learning_curve
from peftlab.store import RunDir, read_jsonl, write_json, write_jsonl
from peftlab.sweep import read_point

STEP_KEYS = {"kind", "step", "epoch", "train_loss", "lr", "grad_norm"}


class TinyModel(nn.Module):
    """Logistic regression on 4 features: the engine's bookkeeping without a transformer's cost."""

    main_input_name = "x"

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.linear(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {"x": torch.tensor([r["x"] for r in rows]), "labels": torch.tensor([r["labels"] for r in rows])}


def train_tiny(folder: Path, **settings) -> tuple[engine.TrainResult, list[str]]:
    """20 rows, batch 4: 5 optimizer steps an epoch, 2 epochs, no validation; the same weights every call."""
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    rows = Dataset.from_dict({"x": x.tolist(), "labels": (x[:, 0] > 0).long().tolist()})
    torch.manual_seed(0)
    spec = TrainSpec(epochs=2, batch_size=4, lr=0.1, precision="fp32", **settings)
    lines: list[str] = []
    result = engine.train(TinyModel(), rows, None, collate, spec, RunDir(folder), precision="fp32", log=lines.append)
    return result, lines


def kinds(history: list[dict], kind: str) -> list[dict]:
    return [row for row in history if row["kind"] == kind]


@pytest.fixture(scope="module")
def every_2_and_per_epoch(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("history")
    return train_tiny(tmp / "every2", log_every=2), train_tiny(tmp / "per_epoch", log_every=100), tmp


def test_step_rows_every_n_steps_and_at_each_epoch_end(every_2_and_per_epoch) -> None:
    (result, _), _, tmp = every_2_and_per_epoch
    steps = kinds(result.history, "step")
    # every 2nd step, and the last step of each epoch (5) so that no loss window spans two epochs
    assert [r["step"] for r in steps] == [2, 4, 5, 6, 8, 10]
    assert [r["epoch"] for r in steps] == [0.4, 0.8, 1.0, 1.2, 1.6, 2.0]
    assert all(set(r) == STEP_KEYS for r in steps)
    assert steps[0]["lr"] > steps[-1]["lr"] > 0  # the linear schedule, as the Trainer logged it
    epochs = kinds(result.history, "epoch")
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1.0, 5), (2.0, 10)]
    assert all(
        {"train_loss", "lr", "grad_norm", "epoch_seconds", "wall_seconds", "tokens_seen"} <= set(r) for r in epochs
    )
    # in training order, each epoch row after its epoch's step rows; the file holds the same rows
    assert [r["step"] for r in result.history] == [2, 4, 5, 5, 6, 8, 10, 10]
    assert read_jsonl(tmp / "every2" / "history.jsonl") == result.history


def test_epoch_train_loss_is_the_mean_over_its_steps(every_2_and_per_epoch) -> None:
    (often, _), (rarely, _), _ = every_2_and_per_epoch
    steps = {r["step"]: r["train_loss"] for r in kinds(often.history, "step")}
    # each step row is the mean since the previous log: weight it by the steps it covers
    epoch1 = (2 * steps[2] + 2 * steps[4] + 1 * steps[5]) / 5
    epoch2 = (1 * steps[6] + 2 * steps[8] + 2 * steps[10]) / 5
    assert [r["train_loss"] for r in kinds(often.history, "epoch")] == pytest.approx([epoch1, epoch2], rel=1e-9)
    # the same training logged once an epoch (the Trainer's own epoch mean) gives the same epoch rows
    assert [r["step"] for r in kinds(rarely.history, "step")] == [5, 10]
    expected = [r["train_loss"] for r in kinds(rarely.history, "epoch")]
    assert [r["train_loss"] for r in kinds(often.history, "epoch")] == pytest.approx(expected, rel=1e-5)
    assert epoch1 != pytest.approx(steps[5], rel=1e-3)  # the epoch row is not just its last step's loss


def test_progress_stays_one_line_an_epoch(every_2_and_per_epoch) -> None:
    (_, lines), _, _ = every_2_and_per_epoch
    assert len(lines) == 2 and lines[0].startswith("[] epoch 1/2  step 5  train loss ")
    assert lines[1].startswith("[] epoch 2/2  step 10  train loss ")


def test_log_every_auto_is_about_20_points_an_epoch() -> None:
    assert engine.log_steps(TrainSpec(batch_size=8), 48) == 1  # 6 steps an epoch: every step
    assert engine.log_steps(TrainSpec(batch_size=8), 8000) == 50  # 1000 steps an epoch
    assert engine.log_steps(TrainSpec(batch_size=8, grad_accum=4), 8000) == 12  # 250 optimizer steps
    assert engine.log_steps(TrainSpec(batch_size=8, log_every=7), 8000) == 7


def test_a_resumed_window_counts_only_its_own_steps() -> None:
    """Each loss log records the steps it averages (`loss_steps`), so a resume (a new window from the
    checkpoint's step) and an old log without the count both give the right epoch mean."""
    log = [
        {"loss": 1.0, "loss_steps": 3, "epoch": 0.5, "step": 3},  # logged at checkpoint-3, then killed
        {"loss": 2.0, "loss_steps": 3, "epoch": 1.0, "step": 6},  # resumed from checkpoint-3
        {"epoch": 1.0, "step": 6, "epoch_seconds": 1.5, "wall_seconds": 9.0, "tokens_seen": 60},
        {"eval_loss": 0.9, "eval_accuracy": 0.5, "eval_runtime": 0.1, "epoch": 1.0, "step": 6},
        {"loss": 4.0, "epoch": 2.0, "step": 12},  # from a checkpoint of a peftlab that logged once an epoch
        {"epoch": 2.0, "step": 12, "epoch_seconds": 1.0, "wall_seconds": 10.0, "tokens_seen": 120},
        {"train_loss": 2.5, "train_runtime": 3.0, "epoch": 2.0, "step": 12},  # the Trainer's final summary
    ]
    rows = engine.history_rows(log)
    assert [(r["kind"], r["step"]) for r in rows] == [
        ("step", 3),
        ("step", 6),
        ("epoch", 6),
        ("step", 12),
        ("epoch", 12),
    ]
    first, second = (r for r in rows if r["kind"] == "epoch")
    assert first == {
        "kind": "epoch",
        "epoch": 1.0,
        "step": 6,
        "epoch_seconds": 1.5,
        "wall_seconds": 9.0,
        "tokens_seen": 60,
        "val_loss": 0.9,
        "eval_accuracy": 0.5,
        "train_loss": 1.5,
    }
    assert second["train_loss"] == 4.0 and "val_loss" not in second


def history_file(folder: Path, rows: list[dict]) -> RunDir:
    write_jsonl(folder / "history.jsonl", rows)
    write_json(folder / "status.json", {"state": "done"})
    write_json(folder / "metrics.json", {"eval": {"validation": {"accuracy": 0.75}}})
    return RunDir(folder)


NEW = [
    {"kind": "step", "step": 1, "epoch": 0.5, "train_loss": 1.3, "lr": 0.1, "grad_norm": 1.0},
    {"kind": "step", "step": 2, "epoch": 1.0, "train_loss": 1.1, "lr": 0.05, "grad_norm": 1.0},
    {"kind": "epoch", "epoch": 1.0, "step": 2, "train_loss": 1.2, "val_loss": 1.25, "epoch_seconds": 1.0},
    {"kind": "step", "step": 3, "epoch": 1.5, "train_loss": 0.4, "lr": 0.01, "grad_norm": 1.0},  # epoch 2 cut short
]
OLD = [  # written before step rows: no kind
    {"epoch": 1.0, "step": 2, "train_loss": 1.2, "val_loss": 1.25, "epoch_seconds": 1.0},
    {"epoch": 2.0, "step": 4, "train_loss": 0.9, "val_loss": 1.0, "epoch_seconds": 1.0},
]


def test_readers_take_epoch_rows_and_old_files(tmp_path: Path) -> None:
    new, old = history_file(tmp_path / "new", NEW), history_file(tmp_path / "old", OLD)
    assert new.history() == NEW and new.history("epoch") == [NEW[2]] and len(new.history("step")) == 3
    assert old.history("epoch") == OLD and old.history("step") == []
    point = read_point([new, old], "lora", {"train.lr": 0.1}, "loss")
    assert point.train_loss == [1.2, 0.9] and point.val_loss == [1.25, 1.0] and point.value == [1.25, 1.0]


def test_learning_curve_draws_steps_as_a_line_and_validation_per_epoch(tmp_path: Path) -> None:
    assert curve_series(NEW) == {
        "training loss (steps)": [(0.5, 1.3), (1.0, 1.1), (1.5, 0.4)],
        "training loss (epoch mean)": [(1.0, 1.2)],
        "validation loss": [(1.0, 1.25)],
    }
    assert curve_series(OLD) == {
        "training loss": [(1.0, 1.2), (2.0, 0.9)],
        "validation loss": [(1.0, 1.25), (2.0, 1.0)],
    }
    assert curve_series([]) == {} and learning_curve([], "t", tmp_path / "none.png") is None
    path = learning_curve(NEW, "t", tmp_path / "curve.png")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
