"""Experiment trackers (`train.report_to`): TensorBoard event files under the run folder with the training
loss, the run name and its settings; MLflow in a local store (when installed); config errors before training."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from peftlab import tracking
from peftlab.cli import main
from peftlab.config import load_experiment
from peftlab.errors import EXIT_BAD_INPUT, EXIT_OK, InputError
from peftlab.experiment import run_experiment
from peftlab.store import RunDir
from tests.conftest import tiny_experiment, write_experiment

# 24 training rows, batch 8: 3 steps an epoch, 2 epochs
TRAIN = {"epochs": 2, "batch_size": 8, "precision": "fp32", "log_every": 2}


def experiment(tmp_path: Path, **train) -> dict:
    exp = tiny_experiment(tmp_path, methods={"lora": {"r": 2}}, train={**TRAIN, **train})
    exp["data"]["limits"] = {"train": 24}
    exp["evaluate"] = {"splits": ["validation"], "baselines": False}
    return exp


def run(tmp_path: Path, exp: dict) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=lines.append)
    return code, lines


def test_tensorboard_gets_the_step_losses_the_run_name_and_its_settings(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    code, lines = run(tmp_path, experiment(tmp_path, report_to=["tensorboard"]))
    assert code == EXIT_OK, lines
    folder = RunDir(tmp_path / "runs" / "tiny" / "lora")
    events = EventAccumulator(str(folder.path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    steps = folder.history("step")
    assert [r["step"] for r in steps] == [2, 3, 4, 6]  # every 2nd step and each epoch's last (3, 6)
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [r["step"] for r in steps]
    assert [e.value for e in logged] == pytest.approx([r["train_loss"] for r in steps], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")] == [3, 6]
    args = events.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"run_name": "lora"' in args
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["run"].string_value == "lora" and hparams["experiment"].string_value == "tiny"
    assert hparams["train.lr"].number_value == pytest.approx(folder.config()["train"]["lr"])
    assert hparams["settings.r"].number_value == 2
    # how a run is watched is not one of its settings: without the tracker the finished run is kept
    code, lines = run(tmp_path, experiment(tmp_path))
    assert code == EXIT_OK and "[lora] done already: skipped" in lines


def test_mlflow_logs_to_a_local_store_under_the_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    code, lines = run(tmp_path, experiment(tmp_path, report_to=["mlflow"]))
    assert code == EXIT_OK, lines
    assert "MLFLOW_TRACKING_URI" not in os.environ  # set for the run only
    store = tmp_path / "runs" / "tiny" / "mlruns"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=store.as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert found.info.run_name == "lora" and found.info.status == "FINISHED"
    assert found.data.params["peftlab.run"] == "lora" and found.data.params["peftlab.settings.r"] == "2"
    steps = RunDir(tmp_path / "runs" / "tiny" / "lora").history("step")
    logged = sorted(client.get_metric_history(found.info.run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in logged] == [(r["step"], pytest.approx(r["train_loss"])) for r in steps]


def test_an_unknown_tracker_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_experiment(tmp_path, experiment(tmp_path, report_to=["tensorbord"]))
    with pytest.raises(
        InputError, match=r"train\.report_to.*unknown tracker 'tensorbord' \(did you mean 'tensorboard'"
    ):
        load_experiment(path)
    assert main(["run", str(path)]) == EXIT_BAD_INPUT
    assert "train.report_to" in capsys.readouterr().err
    assert load_experiment(
        write_experiment(tmp_path, experiment(tmp_path, report_to="tensorboard"))
    ).spec.train.report_to == ["tensorboard"]


def test_a_tracker_that_is_not_installed_stops_the_run_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(tracking.TRACKERS, "mlflow", tracking.Tracker("peftlab_no_such_module", "mlflow"))
    exp = experiment(tmp_path, report_to=["tensorboard"])
    exp["methods"]["lora"]["train"] = {"report_to": ["mlflow"]}  # a method's own override is checked too
    with pytest.raises(InputError, match=r"train\.report_to: mlflow is not installed.*pip install 'peftlab\[mlflow\]'"):
        run(tmp_path, exp)
    assert not (tmp_path / "runs" / "tiny" / "lora").exists()
