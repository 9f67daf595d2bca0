"""Data-parallel runs (peftlab.distributed): a tiny LoRA run trains in 2 CPU processes under torchrun
(gloo), rank 0 alone writes the run folder, and the global batch is 2 x batch_size."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from peftlab import distributed
from peftlab.cli import main
from peftlab.errors import EXIT_BAD_INPUT, EXIT_OK, InputError
from peftlab.executor import check_launch
from peftlab.store import DONE, RunDir, epoch_rows, read_jsonl
from tests.conftest import tiny_experiment, write_experiment

TRAIN = 48  # tests/data/tiny_cls: training examples
BATCH = 4


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, Path]:
    tmp_path = tmp_path_factory.mktemp("ddp")
    scratch = tmp_path / "scratch"  # the replicas' temporary folders go here (TMPDIR)
    scratch.mkdir()
    exp = tiny_experiment(
        tmp_path,
        methods={"lora": {"r": 4}},
        train={"epochs": 2, "batch_size": BATCH, "precision": "fp32"},
        evaluate={"baselines": False},
        executor={"nproc_per_run": 2},
    )
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(scratch)
    try:
        rc = main(["run", str(write_experiment(tmp_path, exp))])
    finally:
        os.environ.pop("TMPDIR") if before is None else os.environ.__setitem__("TMPDIR", before)
    return tmp_path / "runs" / "tiny", rc, scratch


def test_a_run_trains_in_two_processes_with_a_global_batch(two_processes: tuple[Path, int, Path]) -> None:
    root, rc, _ = two_processes
    assert rc == EXIT_OK
    run = RunDir(root / "lora")
    assert run.status()["state"] == DONE and run.damage() is None
    metrics = json.loads(run.metrics_file.read_text())
    train = metrics["train"]
    assert train["processes"] == 2 and train["global_batch_size"] == 2 * BATCH
    steps_per_epoch = TRAIN // (2 * BATCH)  # one process would take TRAIN // BATCH = 12
    assert train["steps"] == 2 * steps_per_epoch
    assert [r["step"] for r in epoch_rows(read_jsonl(run.history_file))] == [steps_per_epoch, 2 * steps_per_epoch]
    assert {p.name for p in run.predictions_dir.iterdir()} >= {"validation.jsonl", "test.jsonl"}
    assert (run.adapter_dir / "adapter_model.safetensors").exists()


def test_only_rank_0_writes(two_processes: tuple[Path, int, Path]) -> None:
    root, _, scratch = two_processes
    runs = [p.name for p in root.iterdir() if (p / "config.yaml").exists()]
    assert runs == ["lora"]
    assert not (root / "lora" / "checkpoints").exists()
    left = [p.name for p in scratch.iterdir()]
    assert any(n.startswith("torchelastic_") for n in left)  # the processes did take TMPDIR for temp files
    assert not [n for n in left if n.startswith("peftlab-rank")]  # the replica's temporary run folder is gone


def test_inline_cannot_run_several_processes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    exp = tiny_experiment(tmp_path, executor={"name": "inline", "nproc_per_run": 2})
    assert main(["run", str(write_experiment(tmp_path, exp))]) == EXIT_BAD_INPUT
    assert "executor.nproc_per_run: 2 processes per run need the process or ray executor" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_peftlab_run_under_torchrun_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match=r"set executor.nproc_per_run"):
        check_launch("process", 1)


def test_launch_argv_and_agree_without_a_group(monkeypatch: pytest.MonkeyPatch) -> None:
    assert distributed.launch_argv(1, "peftlab.worker", "{}") == [sys.executable, "-m", "peftlab.worker", "{}"]
    argv = distributed.launch_argv(3, "peftlab.worker", "{}")
    assert (
        argv[1:3] == ["-m", "torch.distributed.run"]
        and "--nproc_per_node=3" in argv
        and argv[-2:]
        == [
            "peftlab.worker",
            "{}",
        ]
    )
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.agree(lambda: "decided") == "decided" and not distributed.is_replica()
