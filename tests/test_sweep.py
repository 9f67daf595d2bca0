"""Sweeps: grid expansion, names, lr auto, seeds, bad input; the sweep-then-train protocol end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from peftlab.cli import main
from peftlab.config import LoadedExperiment, load_experiment
from peftlab.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_RUN_FAILED, InputError
from peftlab.experiment import run_experiment
from peftlab.store import read_jsonl
from tests.conftest import DATA, TINY_BERT, tiny_experiment, write_experiment

FAST = {"epochs": 1, "batch_size": 8, "precision": "fp32"}


def load(tmp_path: Path, overrides: list[str] | None = None, **changes) -> LoadedExperiment:
    return load_experiment(write_experiment(tmp_path, tiny_experiment(tmp_path, **changes)), overrides)


def error_of(tmp_path: Path, **changes) -> str:
    with pytest.raises(InputError) as info:
        load(tmp_path, **changes)
    return str(info.value)


def by_name(exp: LoadedExperiment) -> dict:
    return {run.name: run for run in exp.runs}


# --- expansion -------------------------------------------------------------------------------


def test_rank_grid_names_each_point_and_leaves_other_methods_alone(tmp_path: Path) -> None:
    exp = load(tmp_path, methods={"full": {}, "lora": {"r": 8}}, sweep={"grid": {"lora.r": [1, 2, 4]}})
    runs = by_name(exp)
    assert list(runs) == ["full", "lora-r1", "lora-r2", "lora-r4"]
    assert [runs[f"lora-r{r}"].settings["r"] for r in (1, 2, 4)] == [1, 2, 4]
    assert runs["lora-r2"].base == "lora" and runs["lora-r2"].point == {"lora.r": 2}
    assert runs["full"].point == {} and runs["full"].train.lr == 5e-5


def test_lr_auto_is_a_grid_around_each_methods_default(tmp_path: Path) -> None:
    exp = load(tmp_path, sweep={"grid": {"train.lr": "auto"}})
    lrs = {run.name: run.train.lr for run in exp.runs}
    assert lrs == {
        "full-lr1.5e-05": 1.5e-5,
        "full-lr5e-05": 5e-5,
        "full-lr0.00015": 1.5e-4,
        "lora-lr0.0006": 6e-4,
        "lora-lr0.002": 2e-3,
        "lora-lr0.006": 6e-3,
        "ia3-lr0.006": 6e-3,
        "ia3-lr0.02": 2e-2,
        "ia3-lr0.06": 6e-2,
    }


def test_a_run_level_key_beats_a_global_one_and_lists_are_values(tmp_path: Path) -> None:
    grid = {"train.lr": [1e-3], "ia3.train.lr": [1e-2, 3e-2], "lora.target_modules": [["query", "value"], "all-linear"]}
    exp = load(tmp_path, methods={"lora": {}, "ia3": {}}, sweep={"grid": grid})
    runs = by_name(exp)
    assert list(runs) == [
        "lora-lr0.001-target_modules_query_value",
        "lora-lr0.001-target_modules_all-linear",
        "ia3-lr0.01",
        "ia3-lr0.03",
    ]
    assert runs["lora-lr0.001-target_modules_all-linear"].settings["target_modules"] == "all-linear"
    assert runs["ia3-lr0.03"].train.lr == 3e-2


def test_seeds_repeat_every_point(tmp_path: Path) -> None:
    exp = load(
        tmp_path,
        methods={"lora": {}},
        train={**FAST, "seeds": [0, 1, 2]},
        sweep={"grid": {"lora.r": [1, 2]}},
    )
    assert [(r.name, r.train.seed, r.base) for r in exp.runs] == [
        ("lora-r1-seed0", 0, "lora"),
        ("lora-r1-seed1", 1, "lora"),
        ("lora-r1-seed2", 2, "lora"),
        ("lora-r2-seed0", 0, "lora"),
        ("lora-r2-seed1", 1, "lora"),
        ("lora-r2-seed2", 2, "lora"),
    ]
    plain = load(tmp_path, methods={"ia3": {}}, train={**FAST, "seeds": [3, 4]})
    assert [(r.name, r.train.seed, r.base_name) for r in plain.runs] == [
        ("ia3-seed3", 3, "ia3"),
        ("ia3-seed4", 4, "ia3"),
    ]


def test_sweep_then_train_makes_short_points_and_keeps_the_full_size_candidates(tmp_path: Path) -> None:
    sweep = {"grid": {"train.lr": [1e-3, 1e-2]}, "protocol": "sweep-then-train", "fraction": 0.25, "epochs": 2}
    exp = load(tmp_path, methods={"lora": {}, "ia3": {}}, train={**FAST, "epochs": 3}, sweep=sweep)
    assert [r.name for r in exp.runs] == [
        "sweep/lora-lr0.001",
        "sweep/lora-lr0.01",
        "sweep/ia3-lr0.001",
        "sweep/ia3-lr0.01",
    ]
    point = exp.runs[0]
    assert (point.train.epochs, point.data_fraction, point.eval_splits, point.save_model) == (
        2,
        0.25,
        ("validation",),
        False,
    )
    full_size = exp.sweep.candidates["lora"][1].runs[0]
    assert (full_size.train.epochs, full_size.train.lr, full_size.data_fraction) == (3, 1e-2, 1.0)
    assert (exp.sweep.metric, exp.sweep.direction) == ("loss", "min")


def test_only_keeps_the_named_entries_and_their_points(tmp_path: Path) -> None:
    grid = {"train.lr": [1e-3, 1e-2], "lora.r": [1, 2]}
    exp = load_experiment(write_experiment(tmp_path, tiny_experiment(tmp_path, sweep={"grid": grid})), only=["ia3"])
    assert [r.name for r in exp.runs] == ["ia3-lr0.001", "ia3-lr0.01"]


def test_grid_keys_can_come_from_set_overrides(tmp_path: Path) -> None:
    exp = load(tmp_path, ["sweep.grid.train.lr=[2e-4]"], methods={"lora": {}}, sweep={"grid": {"train.lr": [1e-3]}})
    assert [(r.name, r.train.lr) for r in exp.runs] == [("lora-lr0.0002", 2e-4)]


def test_selection_direction_defaults_from_the_task(tmp_path: Path) -> None:
    sweep = {"grid": {"train.lr": [1e-3]}, "protocol": "sweep-then-train", "metric": "macro_f1"}
    assert load(tmp_path, sweep=sweep).sweep.direction == "max"


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        ({"grid": {"lorra.r": [1]}}, "sweep.grid.lorra.r: unknown key: 'lorra' is neither 'train', a run nor a method"),
        ({"grid": {"lora.alpah": [1]}}, "sweep.grid.lora.alpah: unknown setting of lora (did you mean 'alpha'?)"),
        ({"grid": {"train.lrr": [1]}}, "sweep.grid.train.lrr: unknown training setting (did you mean 'lr'?)"),
        ({"grid": {"lora.r": []}}, "sweep.grid.lora.r: empty grid: give at least one value"),
        ({"grid": {}}, "sweep.grid: empty grid"),
        ({"grid": {"lora.r": 4}}, "sweep.grid.lora.r: expected a list of values (got 4)"),
        ({"grid": {"lora.r": [4, 0]}}, "sweep.grid.lora.r: value 0: Input should be greater than 0"),
        ({"grid": {"train.seed": [0, 1]}}, "seeds are not a grid axis: set train.seeds"),
        ({"grid": {"lora.r": [1]}, "metric": "f1"}, "sweep.metric: the classification task does not report 'f1'"),
        ({"grid": {"lora.r": [1]}, "direction": "up"}, "sweep.direction: Input should be 'min' or 'max'"),
        (
            {"grid": {"lora.r": [1]}, "protocol": "sweep-then-train", "fraction": 0},
            "sweep.fraction: Input should be greater than 0",
        ),
        (
            {"grid": {"lora.r": [1]}, "protocol": "sweep-then-train", "fraction": 1.5},
            "sweep.fraction: Input should be less than or equal to 1",
        ),
        ({"grid": {"lora.r": [1]}, "fraction": 0.5}, "sweep.fraction: only used with protocol: sweep-then-train"),
        (
            {"grid": {"lora.r": [1]}, "protocol": "random"},
            "sweep.protocol: Input should be 'grid' or 'sweep-then-train'",
        ),
    ],
)
def test_bad_sweeps_are_input_errors_naming_the_key(tmp_path: Path, sweep: dict, expected: str) -> None:
    assert expected in error_of(tmp_path, sweep=sweep)


def test_bad_sweep_exits_2_before_anything_is_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_experiment(tmp_path, tiny_experiment(tmp_path, sweep={"grid": {"lora.r": []}}))
    assert main(["run", str(path)]) == EXIT_BAD_INPUT
    assert "exp.yaml:" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_plan_lists_every_point_with_its_trainable_parameters(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = {"grid": {"lora.r": [1, 2]}, "protocol": "sweep-then-train"}
    path = write_experiment(tmp_path, tiny_experiment(tmp_path, methods={"lora": {}}, sweep=sweep))
    assert main(["plan", str(path), "--json"]) == EXIT_OK
    rows = json.loads(capsys.readouterr().out)
    # tiny BERT: 2 layers x (query, value) x (32 r + r 32) + the classifier head 32 x 3 + 3
    assert [(r["run"], r["trainable"]) for r in rows] == [("sweep/lora-r1", 2 * 2 * 64 + 99), ("sweep/lora-r2", 611)]
    assert main(["plan", str(path)]) == EXIT_OK
    assert "then lora train in full with the point of min validation loss" in capsys.readouterr().out


# --- the protocol, end to end on a tiny model ------------------------------------------------


def run(tmp_path: Path, exp: dict, **kw) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=lines.append, **kw)
    return code, lines


def test_sweep_then_train_selects_the_lowest_validation_loss_and_trains_it_in_full(tmp_path: Path) -> None:
    sweep = {"grid": {"train.lr": [1e-4, 3e-3, 3e-2]}, "protocol": "sweep-then-train", "fraction": 0.5}
    exp = tiny_experiment(tmp_path, methods={"lora": {"r": 2}}, train={**FAST, "epochs": 2}, sweep=sweep)
    exp["evaluate"] = {"baselines": False, "extra": {"held_out": str(DATA / "tiny_cls" / "test.jsonl")}}
    code, lines = run(tmp_path, exp)
    assert code == EXIT_OK, lines
    root = tmp_path / "runs" / "tiny"
    val_loss = {}
    for lr in ("0.0001", "0.003", "0.03"):
        point = root / "sweep" / f"lora-lr{lr}"
        metrics = json.loads((point / "metrics.json").read_text())
        assert metrics["train"]["train_examples"] == 24 and metrics["train"]["epochs"] == 1
        assert list(metrics["eval"]) == ["validation"] and not (point / "adapter").exists()
        val_loss[float(lr)] = read_jsonl(point / "history.jsonl")[-1]["val_loss"]
    best = min(val_loss, key=val_loss.get)
    final = json.loads((root / "lora" / "metrics.json").read_text())
    assert final["lr"] == best and final["train"]["train_examples"] == 48 and final["train"]["epochs"] == 2
    assert set(final["eval"]) == {"validation", "test", "held_out"} and final["eval"]["held_out"]["n"] == 12
    assert (root / "lora" / "adapter").is_dir()
    report = (root / "report.md").read_text()
    assert "## Sweep (sweep-then-train)" in report and f"| **lr {best:g}** |" in report
    assert any(f"[lora] selected train.lr={best}" in line for line in lines)
    code, lines = run(tmp_path, exp)
    assert code == EXIT_OK and sum("done already: skipped" in line for line in lines) == 4


def test_a_failed_point_is_recorded_and_the_others_go_on(tmp_path: Path) -> None:
    sweep = {"grid": {"lora.target_modules": [["query"], ["no_such_module"]]}, "protocol": "sweep-then-train"}
    exp = tiny_experiment(tmp_path, methods={"lora": {"r": 2}}, train=FAST, sweep=sweep)
    exp["evaluate"] = {"baselines": False}
    code, _ = run(tmp_path, exp)
    root = tmp_path / "runs" / "tiny"
    status = json.loads((root / "sweep" / "lora-target_modules_no_such_module" / "status.json").read_text())
    assert code == EXIT_RUN_FAILED and status["state"] == "failed" and "No modules were targeted" in status["error"]
    final = json.loads((root / "lora" / "metrics.json").read_text())
    assert final["settings"]["target_modules"] == ["query"]
    report = (root / "report.md").read_text()
    assert "| target_modules [no_such_module] (failed) |" in report
    failure = "sweep/lora-target_modules_no_such_module failed: NoMatchingPeftModuleError: No modules were targeted"
    assert failure in report


def test_an_evaluation_set_with_unknown_labels_fails_before_training(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hello", "label": "sarcastic"}) + "\n")
    exp = tiny_experiment(tmp_path, methods={"ia3": {}}, train=FAST)
    exp["evaluate"] = {"extra": {"odd": str(bad)}}
    with pytest.raises(InputError, match=r"evaluate\.extra\.odd: .*labels not in the label set.*'sarcastic'"):
        run(tmp_path, exp)
    assert not (tmp_path / "runs" / "tiny" / "ia3").exists()


def test_killed_sweep_finishes_only_the_missing_points(tmp_path: Path) -> None:
    """Kill `peftlab run` once two of five points are done; the rerun skips those and trains the rest."""
    exp = tiny_experiment(tmp_path, methods={"ia3": {}}, train={**FAST, "batch_size": 4})
    exp["sweep"] = {"grid": {"train.lr": [1e-3, 2e-3, 3e-3, 4e-3, 5e-3]}}
    exp["evaluate"] = {"baselines": False, "splits": ["validation"]}
    path = write_experiment(tmp_path, exp)
    root = tmp_path / "runs" / "tiny"
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftlab", "run", str(path), "--executor", "inline"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def finished() -> list[str]:
        return sorted(p.parent.name for p in root.glob("*/status.json") if '"done"' in p.read_text())

    deadline = time.time() + 180
    while time.time() < deadline and len(finished()) < 2:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = finished()
    assert 2 <= len(done_before) < 5, done_before
    code, lines = run(tmp_path, exp)
    skipped = sorted(line.split("]")[0].strip("[").split(" ")[-1] for line in lines if "done already" in line)
    trained = sorted(line.split("]")[0].split("[")[-1] for line in lines if "trainable of" in line)
    assert code == EXIT_OK and skipped == done_before
    assert sorted(skipped + trained) == [f"ia3-lr0.00{i}" for i in range(1, 6)]
    assert len(finished()) == 5


# --- sweeps in a multi-task experiment -------------------------------------------------------


def multitask(tmp_path: Path, **changes) -> dict:
    """Two tasks (classification, multiple choice) over one tiny model."""
    exp = tiny_experiment(tmp_path, name="multi", train=FAST, **changes)
    del exp["model"], exp["task"], exp["data"]
    exp["models"] = {"tiny": TINY_BERT}
    exp["tasks"] = [
        {"key": "cls", "task": "classification", "data": {"source": str(DATA / "tiny_cls"), "max_length": 32}},
        {"key": "mc", "task": "multiple_choice", "data": {"source": str(DATA / "tiny_mc"), "max_length": 24}},
    ]
    exp["evaluate"] = {"baselines": False, "splits": ["validation"]}
    return exp


def test_a_multitask_sweep_expands_per_group_and_run_keys_name_the_method_entry(tmp_path: Path) -> None:
    methods = {"full": {}, "lora": {"r": 4}, "small": {"method": "lora", "r": 2}}
    grid = {"lora.r": [1, 2], "small.train.lr": [1e-3, 1e-4]}  # lora and small: method entries (RUN keys)
    exp = load_experiment(write_experiment(tmp_path, multitask(tmp_path, methods=methods, sweep={"grid": grid})))
    points = ["full", "lora-r1", "lora-r2", "small-lr0.001", "small-lr0.0001"]
    assert [r.name for r in exp.runs] == [f"tiny.{task}.{p}" for task in ("cls", "mc") for p in points]
    for group in exp.groups():
        assert [r.name for r in group.runs] == [f"{group.group_name}.{p}" for p in points]
        small = group.runs[3]
        assert small.group == {**group.group, "method": "small"} and small.base == f"{group.group_name}.small"
        assert (small.train.lr, small.settings["r"], small.point) == (1e-3, 2, {"small.train.lr": 1e-3})
        assert group.sweep.runs == group.runs
    assert exp.sweep.runs == exp.runs  # the groups' plans combined (what `plan` shows)
    with pytest.raises(InputError, match=r"sweep\.grid\.tiny\.cls\.small\.r: unknown key: 'tiny'"):
        bad = multitask(tmp_path, methods=methods, sweep={"grid": {"tiny.cls.small.r": [1]}})
        load_experiment(write_experiment(tmp_path, bad))


def test_sweep_then_train_selects_per_group_and_the_worker_trains_a_point_of_its_group(tmp_path: Path) -> None:
    sweep = {"grid": {"lora.r": [1, 2]}, "protocol": "sweep-then-train", "fraction": 0.5}
    exp = multitask(tmp_path, methods={"lora": {"r": 4}}, sweep=sweep)
    code, lines = run(tmp_path, exp)
    assert code == EXIT_OK, lines
    root = tmp_path / "runs" / "multi"
    record = json.loads((root / "sweep" / "sweep.json").read_text())
    assert list(record["bases"]) == ["tiny.cls.lora", "tiny.mc.lora"]
    assert record["bases"]["tiny.mc.lora"][1]["runs"] == ["sweep/tiny.mc.lora-r2"]
    point_metrics = json.loads((root / "sweep" / "tiny.mc.lora-r1" / "metrics.json").read_text())
    assert point_metrics["train"]["train_examples"] == 20
    for group in ("cls", "mc"):
        selected = next(line for line in lines if f"[tiny.{group}.lora] selected lora.r=" in line)
        config = yaml.safe_load((root / f"tiny.{group}.lora" / "config.yaml").read_text())
        assert config["settings"]["r"] == int(selected.split("lora.r=")[1].split(" ")[0])
        assert config["group"] == {"model": "tiny", "task": group, "method": "lora"}
        assert config["sweep"]["stage"] == "final"
    report = (root / "report.md").read_text()
    assert "| Model & method | Trainable params | cls accuracy | mc accuracy |" in report
    assert report.split("## Sweep (sweep-then-train)")[0].count("| tiny (lora) |") == 1  # one summary row
    assert "| **tiny.mc.lora** |" in report and "(tiny.cls.lora 24, tiny.mc.lora 20 examples)" in report

    # The worker (process or Ray task) gets a RunSpec that is not in the file and prepares only its group.
    from peftlab.executor import WorkerJob
    from peftlab.worker import run_job

    loaded = load_experiment(write_experiment(tmp_path, multitask(tmp_path, methods={"lora": {"r": 4}}, sweep=None)))
    point = dataclasses.replace(loaded.groups()[1].runs[0], name="tiny.mc.lora-extra", train=loaded.runs[0].train)
    job = WorkerJob(str(tmp_path / "exp.yaml"), [], point.name, 1, point.to_dict(), os.getcwd())
    assert run_job(job) == EXIT_OK
    metrics = json.loads((root / "tiny.mc.lora-extra" / "metrics.json").read_text())
    assert metrics["task"]["name"] == "multiple_choice" and metrics["train"]["train_examples"] == 40
    # the multi-task report lists a point of an entry as a row of its own, after the entry
    from peftlab.report import build_report

    summary = build_report(root)["md"].read_text().split("## Sweep")[0]
    assert summary.index("| tiny (lora) | ") < summary.index("| tiny (lora-extra) | 1.1K | — | ")  # r 4
