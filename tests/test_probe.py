"""QA end to end on a tiny random model: run + report, `eval` on a SQuAD file, and `probe` side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.errors import EXIT_BAD_INPUT, EXIT_OK, InputError
from peftlab.probe import probe_runs, read_examples, text_table
from peftlab.store import read_jsonl
from peftlab.tasks import TASKS
from tests.conftest import DATA, TINY_BERT, tiny_experiment, write_experiment

ROOT = Path(__file__).parent.parent
PROBES = ROOT / "configs" / "probes" / "qa_probes.yaml"
SQUAD = DATA / "squad_tiny.json"


@pytest.fixture(scope="module")
def qa_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("qa")
    exp = {
        "name": "qa",
        "model": TINY_BERT,
        "task": {"name": "qa", "doc_stride": 16},
        "data": {
            "source": "squad",
            "files": {s: str(SQUAD) for s in ("train", "validation", "test")},
            "max_length": 64,
        },
        "methods": {"lora": {"r": 2}, "ia3": {}},
        "train": {"epochs": 1, "batch_size": 8, "precision": "fp32"},
        "output_dir": str(tmp_path / "runs"),
    }
    assert main(["run", str(write_experiment(tmp_path, exp)), "--executor", "inline"]) == EXIT_OK
    return tmp_path / "runs" / "qa"


def test_qa_run_reports_em_and_f1_per_method(qa_runs: Path) -> None:
    metrics = json.loads((qa_runs / "lora" / "metrics.json").read_text())
    test = metrics["eval"]["test"]
    assert set(test) >= {"exact_match", "f1", "no_answer_pct", "n"} and test["n"] == 12
    assert 0 <= test["exact_match"] <= test["f1"] <= 100
    assert metrics["train"]["train_examples"] == 12 and metrics["train"]["train_sequences"] > 12  # windows
    # lora r=2 on query/value of 2 layers (hidden 32) + the span head qa_outputs (32 x 2 + 2)
    assert metrics["params"]["trainable"] == 2 * 2 * (32 * 2 + 2 * 32) + 32 * 2 + 2
    md = (qa_runs / "report.md").read_text()
    assert "test exact_match" in md and "test f1" in md and "| lora | lora |" in md
    rows = read_jsonl(qa_runs / "lora" / "predictions" / "test.jsonl")
    assert rows[0]["id"] == "q1" and rows[0]["answers"] == ["1836"] and isinstance(rows[0]["prediction"], str)


def test_eval_on_a_squad_file_writes_beside_the_run(qa_runs: Path) -> None:
    run = qa_runs / "lora"
    before = (run / "metrics.json").read_text()
    assert main(["eval", str(run), "--data", str(SQUAD), "--name", "tiny"]) == EXIT_OK
    result = json.loads((run / "evals" / "tiny" / "metrics.json").read_text())
    own = json.loads(before)["eval"]["test"]
    assert result["n"] == 12 and result["metrics"]["f1"] == own["f1"]  # the same file as the run's test split
    assert result["metrics"]["exact_match"] == own["exact_match"]
    assert len(read_jsonl(run / "evals" / "tiny" / "predictions.jsonl")) == 12
    assert (run / "metrics.json").read_text() == before


def test_eval_on_a_bad_squad_file_is_bad_input(qa_runs: Path, tmp_path: Path, capsys) -> None:
    doc = json.loads(SQUAD.read_text())
    doc["data"][1]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    assert main(["eval", str(qa_runs / "lora"), "--data", str(bad)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "bad.json" in err and "example q6" in err and "is not at answer_start 0" in err


def test_probe_side_by_side(qa_runs: Path, capsys) -> None:
    runs = [str(qa_runs / "lora"), str(qa_runs / "ia3")]
    assert main(["probe", *runs, "--examples", str(PROBES)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "lora" in out and "ia3" in out and "multi-constraint" in out and "matches" in out
    md = (qa_runs / "probe.md").read_text()  # default: the experiment folder of the first run
    assert md.count("\n| definition-") == 2 and "| # | category | input | expected | lora | ia3 |" in md
    records = read_jsonl(qa_runs / "probe.jsonl")
    assert len(records) == 14 and {r["category"] for r in records} == {
        "definition",
        "anaphora",
        "temporal",
        "numeric",
        "multi-constraint",
        "multi-part",
        "causal",
    }
    qa = TASKS.get("qa")()
    for record in records:  # every mark is the task's own verdict on the answer shown
        for answer in record["answers"].values():
            shown = "" if answer["answer"] == "[No answer found]" else answer["answer"]
            assert answer["match"] == qa.probe_match({"prediction": shown}, record["expected"])
    matched = sum(r["answers"]["lora"]["match"] for r in records)
    assert f"{matched}/14" in md


def test_probe_output_path_and_classification_runs(tmp_path: Path) -> None:
    exp = tiny_experiment(
        tmp_path, methods={"lora": {"r": 2}}, train={"epochs": 1, "batch_size": 16, "precision": "fp32"}
    )
    assert main(["run", str(write_experiment(tmp_path, exp)), "--executor", "inline"]) == EXIT_OK
    examples = tmp_path / "cls.yaml"
    examples.write_text("- {text: the meal was great, expected: positive, category: easy}\n- {text: awful day}\n")
    result = probe_runs([tmp_path / "runs" / "tiny" / "lora"], examples, tmp_path / "out" / "p.md")
    assert result.output.is_file() and (tmp_path / "out" / "p.jsonl").is_file()
    answer = result.answers["lora"][0]
    assert answer in ("negative", "neutral", "positive") and result.matches["lora"] == [answer == "positive", None]
    assert result.inputs == ["the meal was great", "awful day"]


def test_probe_refuses_runs_of_different_tasks_and_bad_files(qa_runs: Path, tmp_path: Path) -> None:
    exp = tiny_experiment(
        tmp_path, methods={"lora": {"r": 2}}, train={"epochs": 1, "batch_size": 16, "precision": "fp32"}
    )
    assert main(["run", str(write_experiment(tmp_path, exp)), "--executor", "inline"]) == EXIT_OK
    with pytest.raises(InputError, match="different tasks"):
        probe_runs([qa_runs / "lora", tmp_path / "runs" / "tiny" / "lora"], PROBES)
    bad = tmp_path / "bad.yaml"
    bad.write_text("examples: {a: 1}\n")
    with pytest.raises(InputError, match=r"bad\.yaml: expected a non-empty list"):
        read_examples(bad)
    bad.write_text("- just a string\n")
    with pytest.raises(InputError, match=r"bad\.yaml: example 1: expected a mapping"):
        read_examples(bad)


def test_text_table_wraps_cells_to_the_width() -> None:
    table = text_table(["a", "b"], [["x" * 50, "short"]], width=30)
    assert all(len(line) <= 30 for line in table.splitlines()) and table.count("x") == 50
