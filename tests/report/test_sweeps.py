"""Sweep and seed report blocks, on run folders written by hand (exact numbers, no training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from peftlab.report import build_report
from peftlab.report.sweeps import fmt_mean_std
from peftlab.store import write_json, write_jsonl
from peftlab.sweep import PointResult, choose


def write_run(
    root: Path,
    name: str,
    *,
    method: str,
    base: str | None = None,
    point: dict | None = None,
    index: int = 0,
    accuracy: dict[str, float] | None = None,
    trainable: int = 100,
    history: list[dict[str, Any]] | None = None,
    state: str = "done",
) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    config: dict[str, Any] = {"run": name, "method": method, "task": {"name": "classification"}, "train": {"seed": 0}}
    if base is not None:
        config["sweep"] = {"base": base, "stage": "run", "point": point or {}, "index": index}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    write_json(folder / "status.json", {"state": state})
    if state == "done":
        evals = {split: {"accuracy": value, "n": 10} for split, value in (accuracy or {}).items()}
        params = {"trainable": trainable, "total": 1000, "trainable_pct": trainable / 10}
        write_json(folder / "metrics.json", {"eval": evals, "params": params, "train": {"train_seconds": 2.0}})
    write_jsonl(folder / "history.jsonl", history or [])


def experiment(root: Path, methods: list[str], extra: dict | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    evaluate = {"splits": ["validation", "test"], "extra": extra or {}}
    spec = {"name": root.name, "methods": {key: {} for key in methods}, "evaluate": evaluate}
    (root / "experiment.yaml").write_text(yaml.safe_dump(spec))


def test_rank_sweep_with_seeds_and_a_reference(tmp_path: Path) -> None:
    root = tmp_path / "rank"
    experiment(root, ["full", "lora"], extra={"ood": {"source": "x"}})
    scores = {  # (r, seed) -> test accuracy; validation and ood are offsets of it
        (1, 0): 0.60,
        (1, 1): 0.62,
        (4, 0): 0.70,
        (4, 1): 0.74,
    }
    for i, ((r, seed), acc) in enumerate(scores.items()):
        accuracy = {"validation": acc + 0.01, "test": acc, "ood": acc - 0.2}
        write_run(
            root,
            f"lora-r{r}-seed{seed}",
            method="lora",
            base="lora",
            point={"lora.r": r},
            index=i,
            accuracy=accuracy,
            trainable=100 * r,
        )
    for seed, acc in ((0, 0.80), (1, 0.80)):
        accuracy = {"validation": acc, "test": acc, "ood": 0.5}
        write_run(root, f"full-seed{seed}", method="full", base="full", accuracy=accuracy, trainable=1000)
    old = {"validation": 0.0, "test": 0.0, "ood": 0.0}  # moved aside by --fresh: not a run any more
    write_run(
        root, "lora-r4-seed1.replaced-20261122-1200", method="lora", base="lora", point={"lora.r": 4}, accuracy=old
    )
    build_report(root)
    md = (root / "report.md").read_text()
    assert "## Sweep over r (lora)" in md and "replaced" not in md
    assert "| r | Trainable params | validation accuracy | test accuracy | ood accuracy |" in md
    assert "| 1 | 100 | 0.6200 ± 0.0141 | 0.6100 ± 0.0141 | 0.4100 ± 0.0141 |" in md
    assert "| 4 | 400 | 0.7300 ± 0.0283 | 0.7200 ± 0.0283 | 0.5200 ± 0.0283 |" in md
    assert "| full (reference) | 1,000 | 0.8000 ± 0.0000 | 0.8000 ± 0.0000 | 0.5000 ± 0.0000 |" in md
    assert "## Across seeds" in md and "| lora | r 4 | 2/2 | 0.7300 ± 0.0283 |" in md
    for figure in ("sweep-lora-r.png", "sweep-lora-params.png", "seeds.png"):
        assert (root / "figures" / figure).stat().st_size > 1000, figure
    csv = (root / "results.csv").read_text().splitlines()
    assert csv[0].startswith("run,kind,status,method,base,point,") and "ood_accuracy" in csv[0]
    assert any(line.startswith('lora-r1-seed0,run,done,lora,lora,"{""lora.r"": 1}",100,') for line in csv)


def test_sweep_then_train_table_marks_the_choice_and_flags_an_edge(tmp_path: Path) -> None:
    root = tmp_path / "lr"
    experiment(root, ["lora", "ia3"])
    record: dict[str, Any] = {
        "protocol": "sweep-then-train",
        "metric": "loss",
        "direction": "min",
        "fraction": 0.1,
        "epochs": 1,
        "bases": {},
    }
    losses = {
        "lora": [(1e-4, 0.95, 0.90), (1e-3, 0.75, 0.70), (1e-2, 0.70, 0.80)],
        "ia3": [(1e-4, 1.1, 1.0), (1e-3, 1.0, 0.95), (1e-2, 0.9, 0.9)],
    }
    for base, points in losses.items():
        record["bases"][base] = []
        for lr, train_loss, val_loss in points:
            name = f"{base}-lr{lr:g}"
            history = [{"epoch": 1.0, "train_loss": train_loss, "val_loss": val_loss}]
            write_run(root / "sweep", name, method=base, base=base, point={"train.lr": lr}, history=history)
            record["bases"][base].append({"point": {"train.lr": lr}, "runs": [f"sweep/{name}"]})
    write_json(root / "sweep" / "sweep.json", record)
    build_report(root)
    md = (root / "report.md").read_text()
    assert "| Method | Point | Train loss | Validation loss | Chosen |" in md
    assert "| lora | lr 0.0001 | 0.9500 | 0.9000 |  |" in md
    assert "|  | **lr 0.001** | **0.7500** | **0.7000** | **✓** |" in md
    assert (
        "| ia3 | lr 0.0001 | 1.1000 | 1.0000 |  |" in md
        and "|  | **lr 0.01** | **0.9000** | **0.9000** | **✓** |" in md
    )
    assert "ia3: the chosen lr 0.01 is the largest in the grid" in md and "lora: the chosen" not in md
    assert (root / "figures" / "sweep-selection.png").is_file()


def test_choose_takes_the_mean_over_seeds_and_the_first_of_equals() -> None:
    def result(*values: float) -> PointResult:
        return PointResult("lora", {}, [], value=list(values))

    results = [result(0.75), result(0.25, 0.75), result(0.5), result()]
    assert choose(results, "min") == 1  # means 0.75, 0.5, 0.5 (and none): the first of equals
    assert choose([result(0.9), result(0.8, 0.6)], "min") == 1
    assert choose([result(0.9), result(0.8, 0.6)], "max") == 0
    assert choose([result()], "min") is None
    assert (
        fmt_mean_std([]) == "—"
        and fmt_mean_std([0.5]) == "0.5000"
        and fmt_mean_std([1.0, 2.0, 3.0]) == "2.0000 ± 1.0000"
    )
