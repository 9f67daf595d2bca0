"""The mixture section of the report, on a mixture folder written by hand (exact numbers, no training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from peftlab.report.mixture import MixtureView, mixture_blocks, mixture_terminal_lines
from peftlab.report.render import Figure, Heading, Paragraph, Table, to_markdown
from peftlab.store import ExperimentDir, write_json

EXPERTS = [
    {"name": "ner", "primary_metric": "f1", "score_scale": 1.0, "split": "test", "examples": 10},
    {"name": "qa", "primary_metric": "f1", "score_scale": 100.0, "split": "test", "examples": 8},
]


def _scores(ner: float, qa: float) -> dict[str, Any]:
    return {"ner": {"f1": ner}, "qa": {"f1": qa}}


def metrics() -> dict[str, Any]:
    scores = {
        "learned gate": _scores(0.50, 60.0),
        "uniform mix": _scores(0.40, 50.0),
        "expert ner": _scores(0.60, 20.0),
        "expert qa": _scores(0.10, 80.0),
        "merge ties": _scores(0.30, 40.0),
        "without ner": _scores(0.20, 61.0),
        "without qa": _scores(0.55, 30.0),
    }
    kinds = {"learned gate": "mixture", "uniform mix": "baseline", "merge ties": "merge"}
    kinds |= {k: k.split()[0].replace("without", "ablation") for k in scores if k.split()[0] in ("expert", "without")}
    gate = {
        "ner": {"weights": [[0.9, 0.1], [0.7, 0.3]], "entropy": [0.4, 0.8], "own_share": 0.8, "mean_entropy": 0.6},
        "qa": {"weights": [[0.2, 0.8], [0.4, 0.6]], "entropy": [0.7, 0.9], "own_share": 0.7, "mean_entropy": 0.8},
    }
    inference = {
        "ner": {"mixture_seconds": 3.0, "expert_seconds": 2.0, "examples": 10, "single_expert_total": 1_000},
        "qa": {"mixture_seconds": 4.0, "expert_seconds": 4.0, "examples": 8, "single_expert_bytes": 2**21},
    }
    return {
        "mixture": "mix",
        "settings": {"gate": "layerwise", "depth": 1, "gate_size": 64, "softmax_temperature": 1.0, "top_k": None},
        "experts": EXPERTS,
        "layers": ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"],
        "params": {"gate": 10, "experts": 100, "heads": 20, "trainable": 10, "total": 1_130, "weight_bytes": 2**22},
        "train": {"train_seconds": 5.0, "epochs": 1.0, "steps": 3, "examples": {"ner": 10, "qa": 8}},
        "scores": scores,
        "kinds": kinds,
        "failed": {"merge svd": "ValueError: ranks differ"},
        "gate": gate,
        "inference": inference,
        "precision": "fp32",
    }


@pytest.fixture
def exp_dir(tmp_path: Path) -> ExperimentDir:
    folder = tmp_path / "exp" / "_mixtures" / "mix"
    folder.mkdir(parents=True)
    write_json(folder / "status.json", {"state": "done"})
    write_json(folder / "metrics.json", metrics())
    return ExperimentDir(tmp_path / "exp")


def _table(blocks: list, first_header: str) -> Table:
    return next(b for b in blocks if isinstance(b, Table) and b.header[0] == first_header)


def test_scores_are_each_tasks_primary_metric_x100_with_the_best_marked(exp_dir: ExperimentDir) -> None:
    table = _table(mixture_blocks(exp_dir), "Configuration")
    rows = {r[0]: r for r in table.rows}
    assert rows["learned gate"][2:] == ["50.0", "60.0", "55.0"]  # QA's F1 is x100 already: not scaled again
    assert rows["expert ner"][2] == "60.0 *" and rows["expert qa"][3] == "80.0 *"
    assert rows["uniform mix"][1] == "baseline"
    assert table.bold_rows == {0}  # the learned gate


def test_gain_over_uniform_share_of_oracle_and_gate_focus_per_task(exp_dir: ExperimentDir) -> None:
    rows = {r[0]: r for r in _table(mixture_blocks(exp_dir), "Task").rows}
    # Task, learned, uniform, gain, oracle, best other, share of oracle, entropy, own share
    assert rows["ner"] == ["ner", "50.0", "40.0", "+10.0", "60.0", "10.0 (qa)", "83.3", "0.600", "0.800"]
    assert rows["qa"][3:7] == ["+10.0", "80.0", "20.0 (ner)", "75.0"]


def test_ablation_is_the_change_against_the_learned_gate(exp_dir: ExperimentDir) -> None:
    table = _table(mixture_blocks(exp_dir), "Expert removed")
    assert table.rows == [["ner", "-30.0", "+1.0"], ["qa", "+5.0", "-30.0"]]


def test_cost_compares_the_mixture_with_each_single_expert(exp_dir: ExperimentDir) -> None:
    rows = {
        r[0]: r
        for r in next(b for b in mixture_blocks(exp_dir) if isinstance(b, Table) and "Time ratio" in b.header).rows
    }
    assert rows["ner"][2:7] == ["3.0 s", "2.0 s", "1.50", "1,130", "1,000"]
    assert rows["qa"][7:] == ["4.0", "2.0"]  # MiB measured: mixture 4, single expert 2
    assert rows["ner"][8] == "—"  # not measured: shown as missing, never invented


def test_heatmap_and_failed_merges_are_in_the_section(exp_dir: ExperimentDir) -> None:
    blocks = mixture_blocks(exp_dir)
    figure = next(b for b in blocks if isinstance(b, Figure))
    assert (exp_dir.path / figure.path).stat().st_size > 1000
    text = to_markdown("r", blocks)
    assert "merge svd: ValueError: ranks differ" in text
    assert "2 LoRA experts (ner, qa)" in text and "10 trainable of 1,130" in text


def test_an_unfinished_mixture_says_so_and_a_moved_aside_one_is_ignored(exp_dir: ExperimentDir) -> None:
    failed = exp_dir.path / "_mixtures" / "broken"
    failed.mkdir()
    write_json(failed / "status.json", {"state": "failed", "error": "expert qa: not finished"})
    (exp_dir.path / "_mixtures" / "mix.replaced-20260101-000000").mkdir()
    blocks = mixture_blocks(exp_dir)
    headings = [b.text for b in blocks if isinstance(b, Heading)]
    assert headings == ["Mixture of LoRA experts `broken`", "Mixture of LoRA experts `mix`"]
    assert any(isinstance(b, Paragraph) and "expert qa: not finished" in b.text for b in blocks)
    assert mixture_terminal_lines(exp_dir)[1] == "mixture mix (x100):"


def test_no_mixtures_no_section(tmp_path: Path) -> None:
    (tmp_path / "exp").mkdir()
    assert mixture_blocks(ExperimentDir(tmp_path / "exp")) == []


def test_a_lower_is_better_metric_marks_the_lowest() -> None:
    m = metrics()
    m["experts"] = [{**EXPERTS[0], "higher_is_better": False}, EXPERTS[1]]
    table = MixtureView(m).score_table()
    assert next(r for r in table.rows if r[0] == "expert qa")[2] == "10.0 *"
