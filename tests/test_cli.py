"""The command line: verbs, exit codes, messages."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.errors import EXIT_BAD_INPUT, EXIT_OK
from tests.conftest import DATA, tiny_experiment, write_experiment


def test_misspelt_key_exits_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    exp = tiny_experiment(tmp_path)
    exp["trian"] = exp.pop("train")
    assert main(["run", str(write_experiment(tmp_path, exp))]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "trian: unknown key (did you mean 'train'?)" in err and "exp.yaml:" in err


def test_assets_list_and_unknown_fetch(capsys: pytest.CaptureFixture) -> None:
    assert main(["assets", "list"]) == EXIT_OK
    out = capsys.readouterr().out
    assert all(name in out for name in ("minilm-l6", "tweets-3way", "drug-reviews-3way", "rotten-tomatoes"))
    assert main(["assets", "fetch", "nope"]) == EXIT_BAD_INPUT
    assert main(["assets", "fetch"]) == EXIT_BAD_INPUT


def test_plan_prints_counts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", str(write_experiment(tmp_path, tiny_experiment(tmp_path)))]) == EXIT_OK
    out = capsys.readouterr().out
    assert "1,123" in out and "419" in out and "est. memory" in out
    assert main(["plan", str(tmp_path / "exp.yaml"), "--json"]) == EXIT_OK
    rows = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in rows] == ["full", "lora", "ia3"] and rows[1]["trainable"] == 1123


def test_report_on_a_non_experiment_folder_is_bad_input(tmp_path: Path) -> None:
    assert main(["report", str(tmp_path)]) == EXIT_BAD_INPUT


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("cli")
    exp = tiny_experiment(
        tmp_path, methods={"lora": {"r": 2}}, train={"epochs": 1, "batch_size": 16, "precision": "fp32"}
    )
    # the default executor: the run trains in a worker process
    assert main(["run", str(write_experiment(tmp_path, exp))]) == EXIT_OK
    return tmp_path / "runs" / "tiny" / "lora"


def test_eval_writes_beside_the_run_without_touching_its_results(trained_run: Path) -> None:
    before = (trained_run / "metrics.json").read_text()
    assert main(["eval", str(trained_run), "--data", str(DATA / "tiny_cls" / "test.jsonl"), "--name", "ood"]) == 0
    result = json.loads((trained_run / "evals" / "ood" / "metrics.json").read_text())
    own = json.loads(before)["eval"]["test"]["accuracy"]
    assert result["n"] == 12 and result["metrics"]["accuracy"] == own  # the same file as the run's test split
    assert (trained_run / "metrics.json").read_text() == before


def test_eval_on_a_file_without_the_label_field(trained_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello", "sentiment": "positive"}\n')
    assert main(["eval", str(trained_run), "--data", str(bad)]) == EXIT_BAD_INPUT


def test_predict_from_stdin(trained_run: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("the meal was great today\nthe day was awful\n"))
    assert main(["predict", str(trained_run), "--input", "-"]) == EXIT_OK
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and all(r["prediction"] in ("negative", "neutral", "positive") for r in rows)
    assert abs(sum(rows[0]["probs"].values()) - 1) < 1e-3


def test_eval_of_an_unfinished_run_is_bad_input(tmp_path: Path) -> None:
    assert main(["eval", str(tmp_path), "--data", "x.jsonl"]) == EXIT_BAD_INPUT
