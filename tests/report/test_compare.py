"""The comparison view (score against trainable parameters and training time, Pareto fronts), on run
folders written by hand: exact numbers, no training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from peftlab.report import build_report
from peftlab.report.compare import Point, comparison_points, pareto_front
from peftlab.store import ExperimentDir, write_json


def write_run(
    root: Path,
    name: str,
    method: str,
    accuracy: float,
    *,
    trainable: int | None,
    seconds: float | None,
    base: str | None = None,
    point: dict | None = None,
    index: int = 0,
    seed: int = 0,
) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    config: dict[str, Any] = {"run": name, "method": method, "task": {"name": "classification"}}
    config["sweep"] = {"base": base or method, "stage": "run", "point": point or {}, "index": index}
    config["train"] = {"seed": seed}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    write_json(folder / "status.json", {"state": "done"})
    metrics: dict[str, Any] = {
        "task": {"primary_metric": "accuracy", "higher_is_better": True},
        "eval": {"validation": {"accuracy": accuracy, "n": 10}, "test": {"accuracy": accuracy, "n": 10}},
        "params": {} if trainable is None else {"trainable": trainable, "total": 1000},
        "train": {} if seconds is None else {"train_seconds": seconds},
    }
    write_json(folder / "metrics.json", metrics)


def experiment(root: Path, methods: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    spec = {"name": root.name, "methods": {m: {} for m in methods}, "evaluate": {"splits": ["validation", "test"]}}
    (root / "experiment.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def study(root: Path) -> None:
    """full (two seeds), a LoRA rank sweep and (IA)3, with costs chosen so that the fronts are known:
    parameters: ia3 < lora-r1 < lora-r4 < full; time: lora-r1 < lora-r4 < full; lora-r16 beaten on both."""
    experiment(root, ["full", "lora", "ia3"])
    write_run(root, "full-seed0", "full", 0.80, trainable=1000, seconds=10.0, seed=0)
    write_run(root, "full-seed1", "full", 0.82, trainable=1000, seconds=12.0, seed=1)
    for i, (r, acc, seconds) in enumerate([(1, 0.70, 3.0), (4, 0.78, 4.0), (16, 0.76, 5.0)]):
        write_run(
            root,
            f"lora-r{r}",
            "lora",
            acc,
            trainable=10 * r,
            seconds=seconds,
            base="lora",
            point={"lora.r": r},
            index=i,
        )
    write_run(root, "ia3", "ia3", 0.65, trainable=5, seconds=6.0)


def test_fronts_table_and_figures_from_measured_numbers(tmp_path: Path) -> None:
    root = tmp_path / "study"
    study(root)
    build_report(root)
    md = (root / "report.md").read_text()
    assert "## Score against cost" in md
    assert "Front against trainable parameters: ia3, lora-r1, lora-r4, full." in md
    assert "Front against training time: lora-r1, lora-r4, full." in md
    assert "Beaten on every plane: lora-r16." in md
    header = "| Run | Method | Seeds | Trainable params | Train time | test accuracy | Pareto-optimal against |"
    assert header in md
    assert "| full | full | 2 | 1,000 | 11.0 s ± 1.4 s | 0.8100 ± 0.0141 | trainable parameters, training time |" in md
    assert "| ia3 | ia3 | 1 | 5 | 6.0 s | 0.6500 | trainable parameters |" in md
    assert "| lora-r16 |" not in md.split("## Score against cost")[1].split("##")[0]
    for plane in ("params", "time"):
        assert (root / "figures" / f"compare-{plane}.png").stat().st_size > 5000
        assert f"figures/compare-{plane}.png" in md
    assert md.index("## Results") < md.index("## Score against cost")


def test_points_average_seeds_and_keep_their_spread(tmp_path: Path) -> None:
    root = tmp_path / "study"
    study(root)
    points = {p.label: p for p in comparison_points(ExperimentDir(root).runs(), "test", "accuracy")}
    assert list(points) == ["full", "lora-r1", "lora-r4", "lora-r16", "ia3"]
    full = points["full"]
    assert full.scores == [0.80, 0.82] and full.seconds == [10.0, 12.0] and full.params == 1000
    assert abs(full.score - 0.81) < 1e-12 and full.time == 11.0 and full.method == "full"


def test_pareto_front_ties_direction_and_missing_costs() -> None:
    def point(label: str, score: float, params: float | None) -> Point:
        return Point(label, "m", [score], params, [])

    a, b, c, d = point("a", 0.5, 10), point("b", 0.5, 10), point("c", 0.7, 100), point("d", 0.6, 1000)
    none = point("none", 0.9, None)
    front = pareto_front([d, c, b, a, none], lambda p: p.params)
    assert [p.label for p in front] == ["b", "a", "c"]  # equal points beat neither; d is beaten by c
    # lower is better (e.g. perplexity): the low score at high cost is now the good one
    low = pareto_front([a, c, d], lambda p: p.params, higher=False)
    assert [p.label for p in low] == ["a"]


def test_runs_missing_a_number_are_left_out_of_that_plane_and_said(tmp_path: Path) -> None:
    root = tmp_path / "gaps"
    experiment(root, ["full", "lora", "ia3"])
    write_run(root, "full", "full", 0.8, trainable=1000, seconds=10.0)
    write_run(root, "lora", "lora", 0.7, trainable=10, seconds=None)
    write_run(root, "ia3", "ia3", 0.6, trainable=None, seconds=None)
    build_report(root)
    md = (root / "report.md").read_text()
    assert "Front against trainable parameters: lora, full." in md
    assert "Left out of that plane (not recorded): ia3." in md
    assert "training time" not in md.split("## Score against cost")[1].split("\n## ")[0]  # one timed run: no plane
    assert (root / "figures" / "compare-params.png").is_file()
    assert not (root / "figures" / "compare-time.png").exists()


def test_a_single_run_or_no_numbers_gives_no_section(tmp_path: Path) -> None:
    single = tmp_path / "single"
    experiment(single, ["lora"])
    write_run(single, "lora", "lora", 0.7, trainable=10, seconds=1.0)
    build_report(single)
    assert "Score against cost" not in (single / "report.md").read_text()
    bare = tmp_path / "bare"
    experiment(bare, ["lora", "ia3"])
    write_run(bare, "lora", "lora", 0.7, trainable=None, seconds=None)
    write_run(bare, "ia3", "ia3", 0.6, trainable=None, seconds=None)
    build_report(bare)
    assert "Score against cost" not in (bare / "report.md").read_text()
    assert not list((bare / "figures").glob("compare-*")) if (bare / "figures").exists() else True


def test_a_multitask_report_compares_each_tasks_runs(tmp_path: Path) -> None:
    root = tmp_path / "multi"
    root.mkdir()
    task = {"key": "cls", "task": "classification", "data": {"source": "x"}}
    spec = {"name": "multi", "tasks": [task], "methods": {"full": {}, "lora": {}}}
    (root / "experiment.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    for method, acc, trainable, seconds in (("full", 0.8, 1000, 9.0), ("lora", 0.7, 10, 2.0)):
        write_run(root, f"cls.{method}", method, acc, trainable=trainable, seconds=seconds, base=f"cls.{method}")
        config = yaml.safe_load((root / f"cls.{method}" / "config.yaml").read_text())
        config["group"] = {"task": "cls", "method": method}
        (root / f"cls.{method}" / "config.yaml").write_text(yaml.safe_dump(config))
    build_report(root)
    md = (root / "report.md").read_text()
    assert "## Score against cost (cls)" in md and "Front against training time: cls.lora, cls.full." in md
    assert (root / "figures" / "compare-cls-params.png").is_file()


def test_train_times_are_written_as_the_results_table_writes_them() -> None:
    from peftlab.report.compare import _fmt_time

    assert _fmt_time([300.0]) == "5 min 00 s"
    assert _fmt_time([290.0, 310.0]) == "5 min 00 s ± 14.1 s"
