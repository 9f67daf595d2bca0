"""Analysis end to end on tiny random models: after each run, for finished runs (`peftlab analyze`), cached,
on an encoder and a decoder, with bad input refused before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.config import load_experiment
from peftlab.errors import EXIT_BAD_INPUT, EXIT_OK, InputError
from peftlab.experiment import run_experiment
from tests.conftest import tiny_experiment, write_experiment
from tests.tasks.test_causal_classification import ONE_TOKEN, TINY_LLAMA

ANALYSIS = {"weights": True, "drift": {"examples": 6}, "attention": {"examples": 4}}


def _run(tmp_path: Path, **changes) -> tuple[Path, list[str]]:
    exp = tiny_experiment(tmp_path, **changes)
    lines: list[str] = []
    code = run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=lines.append)
    assert code == EXIT_OK, lines
    return tmp_path / "runs" / "tiny", lines


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder, _ = _run(
        tmp_path_factory.mktemp("analysed"), train={"epochs": 1, "batch_size": 8, "lr": 1e-2}, analysis=ANALYSIS
    )
    return folder


def _result(folder: Path, run: str) -> dict:
    return json.loads((folder / run / "analysis" / "analysis.json").read_text())


def test_every_run_is_analysed_after_training_with_every_part(analysed: Path) -> None:
    for run in ("full", "lora", "ia3"):
        result = _result(analysed, run)
        assert result["errors"] == {} and result["method"] == run
        assert result["weights"]["summary"]["matrices"] > 0
        for part in ("drift", "attention"):
            assert set(result[part]["splits"]) == {"validation", "test"}
        drift = result["drift"]["splits"]["test"]
        assert drift["n"] == 6 and len(drift["cka"]) == 3  # embeddings + 2 layers
        assert all(0.0 <= c <= 1.0 + 1e-6 for c in drift["cka"])
        attention = result["attention"]["splits"]["test"]
        assert attention["n"] == 4 and attention["causal"] is False
        assert len(attention["js"]) == 2 and len(attention["js"][0]) == 2  # layers x heads
    lora = _result(analysed, "lora")["weights"]
    assert all(m["rank_limit"] == 4 and m["k90"] <= 4 for m in lora["matrices"])
    assert (analysed / "lora" / "analysis" / "subspaces.npz").exists()
    full = _result(analysed, "full")["weights"]
    # full fine-tuning: the matrices LoRA adapts by default (query, value) in detail, the rest summarised
    assert {m["type"] for m in full["matrices"]} == {"query", "value"} and full["rest"]["matrices"] > 0
    assert "Inside the model" in (analysed / "report.md").read_text()


def test_full_fine_tuning_changes_the_embeddings_and_lora_does_not(analysed: Path) -> None:
    full = _result(analysed, "full")["drift"]["splits"]["test"]["cka"]
    lora = _result(analysed, "lora")["drift"]["splits"]["test"]["cka"]
    assert lora[0] == pytest.approx(1.0, abs=1e-9)  # LoRA on query/value leaves the embedding output as it was
    assert full[0] < 1.0


def test_analyze_reuses_a_current_result_and_force_measures_again(analysed: Path, capsys) -> None:
    before = (analysed / "lora" / "analysis" / "analysis.json").stat().st_mtime_ns
    assert main(["analyze", str(analysed / "lora"), str(analysed / "ia3"), "--no-report"]) == EXIT_OK
    captured = capsys.readouterr()
    assert "up to date" in captured.err and "lora" in captured.out and "ia3" in captured.out
    assert (analysed / "lora" / "analysis" / "analysis.json").stat().st_mtime_ns == before
    assert main(["analyze", str(analysed / "lora"), "--force", "--parts", "weights", "--no-report"]) == EXIT_OK
    result = _result(analysed, "lora")
    assert "drift" not in result and result["weights"]["summary"]["matrices"] > 0


def test_analyze_refuses_bad_input_naming_it(analysed: Path, tmp_path: Path, capsys) -> None:
    assert main(["analyze", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "not a run folder" in capsys.readouterr().err
    assert main(["analyze", str(analysed / "lora"), "--examples", "0"]) == EXIT_BAD_INPUT
    assert "--examples" in capsys.readouterr().err
    assert main(["analyze", str(analysed / "lora"), "--examples", "500", "--force", "--no-report"]) == EXIT_BAD_INPUT
    assert "500 is larger than the 12 examples" in capsys.readouterr().err
    unfinished = tmp_path / "exp" / "lora"
    shutil.copytree(analysed / "lora", unfinished)
    (unfinished / "status.json").write_text(json.dumps({"state": "running"}))
    assert main(["analyze", str(unfinished)]) == EXIT_BAD_INPUT
    assert "not finished" in capsys.readouterr().err


def test_runs_of_different_base_models_are_not_compared(analysed: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "tiny" / "lora"
    shutil.copytree(analysed / "lora", other)
    config = (other / "config.yaml").read_text().replace("hidden_size: 32", "hidden_size: 16")
    (other / "config.yaml").write_text(config)
    assert main(["analyze", str(analysed / "lora"), str(other)]) == EXIT_BAD_INPUT
    assert "different base models" in capsys.readouterr().err


def test_examples_larger_than_a_split_fail_before_training(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path, analysis={"drift": {"examples": 100}})
    with pytest.raises(
        InputError, match=r"analysis.drift.examples: 100 is larger than the 12 examples of 'validation'"
    ):
        run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=lambda m: None)
    assert not (tmp_path / "runs" / "tiny" / "full").exists()


def test_analysis_added_later_measures_finished_runs_without_retraining(tmp_path: Path) -> None:
    methods = {"lora": {"r": 2}}
    folder, _ = _run(tmp_path, methods=methods, train={"epochs": 1, "batch_size": 8})
    assert not (folder / "lora" / "analysis").exists()
    _, lines = _run(tmp_path, methods=methods, train={"epochs": 1, "batch_size": 8}, analysis={"weights": True})
    assert any("done already: skipped" in line for line in lines)
    assert _result(folder, "lora")["weights"]["summary"]["matrices"] == 4


def test_a_decoder_is_analysed_with_causal_attention(tmp_path: Path) -> None:
    folder, _ = _run(
        tmp_path,
        model=TINY_LLAMA,
        task={"name": "causal_classification", "prompt": "text: {text} label:", "verbalizers": ONE_TOKEN},
        methods={"lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]}},
        train={"epochs": 1, "batch_size": 8, "lr": 1e-2},
        evaluate={"splits": ["test"]},
        analysis=ANALYSIS,
    )
    result = _result(folder, "lora")
    assert result["errors"] == {}
    attention = result["attention"]["splits"]["test"]
    assert attention["causal"] is True
    assert {m["type"] for m in result["weights"]["matrices"]} == {"q_proj", "v_proj"}


def test_reduce_intruders_writes_a_new_evaluated_run_that_loads(analysed: Path, capsys) -> None:
    from peftlab.trained import load_run

    args = ["analyze", str(analysed / "lora"), "--reduce-intruders", "0.5", "--parts", "weights", "--no-report"]
    assert main(args) == EXIT_OK
    derived = analysed / "lora-intruders-0.5"
    metrics = json.loads((derived / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"validation", "test"} and metrics["derived"]["from"] == "lora"
    assert metrics["derived"]["mitigation_lambda"] == 0.5
    assert "lora-intruders-0.5" in capsys.readouterr().out  # analysed beside the original
    reloaded = load_run(derived)  # a run like any other: it loads and predicts
    assert reloaded.config["derived"]["how"] == "peft reduce_intruder_dimension"
    assert main(["analyze", str(analysed / "ia3"), "--reduce-intruders", "0.5"]) == EXIT_BAD_INPUT
    shutil.rmtree(derived)
