"""Forgetting sets on a tiny random Llama: base scored once, every run scored, change = run − base.

The base model's cross-entropy on general text is checked against a hand computation (one unpadded
forward pass per paragraph), and bad forgetting settings fail before anything trains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from peftlab.config import load_experiment
from peftlab.errors import EXIT_OK, InputError
from peftlab.experiment import run_experiment
from peftlab.forgetting import changes, forgetting_of
from peftlab.models import load_tokenizer, resolve_model
from peftlab.report.tradeoffs import Point, pareto_front
from peftlab.store import write_jsonl
from tests.conftest import DATA, tiny_experiment, write_experiment
from tests.tasks.test_causal_classification import ONE_TOKEN, TINY_LLAMA

PARAGRAPHS = [
    "The river flows through the old town and past the mill.",
    "A teacher may work in a school, at home, or outdoors with a class.",
    "The war ended with a treaty signed in the spring of that year.",
    "Bread is baked in ovens that are heated with wood or gas.",
]


RUNS = ("full", "lora-r1", "lora-r2")


def wiki(folder: Path) -> Path:
    """General text as SQuAD rows carry it: each paragraph repeated for several questions."""
    rows = [{"id": f"q{i}-{j}", "question": "?", "context": p} for i, p in enumerate(PARAGRAPHS) for j in range(2)]
    path = folder / "wiki.jsonl"
    write_jsonl(path, rows)
    return path


def experiment(tmp_path: Path, **evaluate: object) -> dict:
    evaluate = {"splits": ["test"], "baselines": False, **evaluate}
    return tiny_experiment(
        tmp_path,
        model=TINY_LLAMA,
        task={"name": "causal_classification", "prompt": "review: {text} sentiment:", "verbalizers": ONE_TOKEN},
        methods={"full": {"train": {"lr": 1e-3}}, "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]}},
        train={"epochs": 1, "batch_size": 16, "precision": "fp32"},
        evaluate=evaluate,
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("forgetting")
    exp = experiment(
        tmp_path,
        baselines=True,
        forgetting={
            "wiki": {"source": str(wiki(tmp_path)), "task": "lm_text"},
            "cls": {"source": str(DATA / "tiny_cls"), "split": "test", "limit": 6},  # the experiment's own task
        },
    )
    exp["sweep"] = {"grid": {"lora.r": [1, 2]}}
    lines: list[str] = []
    code = run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=lines.append)
    assert code == EXIT_OK, lines
    return tmp_path / "runs" / "tiny"


def test_every_run_records_base_run_and_change(finished: Path) -> None:
    for run in RUNS:
        record = json.loads((finished / run / "metrics.json").read_text())["forgetting"]
        assert set(record) == {"wiki", "cls"}
        wiki_entry = record["wiki"]
        assert wiki_entry["metric"] == "cross_entropy" and wiki_entry["higher_is_better"] is False
        assert wiki_entry["n"] == len(PARAGRAPHS)  # repeated paragraphs are scored once
        for entry in record.values():
            for key, value in entry["change"].items():
                assert value == entry["run"][key] - entry["base"][key]
        assert record["cls"]["metric"] == "accuracy" and record["cls"]["n"] == 6
        assert (finished / run / "predictions" / "forgetting-wiki.jsonl").exists()
    full = json.loads((finished / "full" / "metrics.json").read_text())["forgetting"]["wiki"]
    assert full["change"]["cross_entropy"] != 0  # full fine-tuning at 1e-3 moves every weight


def test_base_is_measured_once_and_equals_a_hand_computation(finished: Path) -> None:
    files = sorted((finished / "_baselines" / "forgetting").glob("wiki-*.json"))
    files = [f for f in files if not f.name.endswith(".predictions.json")]
    assert len(files) == 1
    base = json.loads(files[0].read_text())["metrics"]
    source = resolve_model(TINY_LLAMA)
    tokenizer = load_tokenizer(source)
    from transformers import AutoModelForCausalLM, set_seed

    from peftlab.models import instantiate

    set_seed(0)
    model = instantiate(AutoModelForCausalLM, source, tokenizer=tokenizer).eval()
    nll, count = 0.0, 0
    for text in PARAGRAPHS:
        ids = torch.tensor([tokenizer(text)["input_ids"][:32]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        nll -= float(logprobs[:-1].gather(-1, ids[0, 1:].unsqueeze(-1)).sum())
        count += ids.shape[1] - 1
    assert base["tokens"] == count
    assert base["cross_entropy"] == pytest.approx(nll / count, rel=1e-4)
    assert base["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    lora = json.loads((finished / "lora-r2" / "metrics.json").read_text())["forgetting"]["wiki"]
    assert lora["base"]["cross_entropy"] == base["cross_entropy"]


def test_forgetting_sign_follows_the_metric_direction() -> None:
    assert changes({"accuracy": 0.5, "n": 10}, {"accuracy": 0.4, "n": 10}) == pytest.approx({"accuracy": -0.1})
    drop = {"metric": "accuracy", "higher_is_better": True, "score_scale": 1.0, "change": {"accuracy": -0.1}}
    rise = {"metric": "cross_entropy", "higher_is_better": False, "score_scale": 1.0, "change": {"cross_entropy": 0.2}}
    assert forgetting_of(drop) == pytest.approx(0.1) and forgetting_of(rise) == pytest.approx(0.2)


def test_forgetting_needs_a_causal_lm_task(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path, evaluate={"forgetting": {"wiki": {"source": "x.jsonl", "task": "lm_text"}}})
    with pytest.raises(InputError) as err:
        load_experiment(write_experiment(tmp_path, exp))
    assert "evaluate.forgetting" in str(err.value) and "causal LM" in str(err.value)


def test_unknown_forgetting_task_and_bad_name_are_named(tmp_path: Path) -> None:
    exp = experiment(tmp_path, forgetting={"wiki": {"source": "x.jsonl", "task": "lm_txt"}})
    with pytest.raises(InputError) as err:
        load_experiment(write_experiment(tmp_path, exp))
    assert "evaluate.forgetting.wiki.task" in str(err.value) and "lm_text" in str(err.value)
    exp = experiment(tmp_path, forgetting={"test": "x.jsonl"})
    with pytest.raises(InputError, match="forgetting set name 'test'"):
        load_experiment(write_experiment(tmp_path, exp))


def test_unreadable_forgetting_rows_fail_before_training(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    write_jsonl(rows, [{"id": "a1", "title": "no text here"}])
    exp = experiment(tmp_path, forgetting={"wiki": {"source": str(rows), "task": "lm_text"}})
    lines: list[str] = []
    with pytest.raises(InputError) as err:
        run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=lines.append)
    assert "evaluate.forgetting.wiki" in str(err.value) and "text_field" in str(err.value)
    assert not (tmp_path / "runs" / "tiny" / "full" / "metrics.json").exists()


def test_report_shows_forgetting_rank_tradeoff_and_the_plane(finished: Path) -> None:
    md = (finished / "report.md").read_text()
    assert "## Forgetting" in md and "## Rank trade-off" in md and "## Learning vs forgetting" in md
    assert (finished / "figures" / "tradeoff-r.png").exists()
    assert (finished / "figures" / "learning-vs-forgetting.png").exists()
    zero_shot = json.loads((finished / "_baselines" / "metrics.json").read_text())["baselines"]["untrained model"]
    points = []
    for run in RUNS:
        metrics = json.loads((finished / run / "metrics.json").read_text())
        drop = -metrics["forgetting"]["cls"]["change"]["accuracy"]  # the only benchmark set (wiki is text)
        gain = metrics["eval"]["test"]["accuracy"] - zero_shot["test"]["accuracy"]
        points.append(Point(run, drop, gain))
        assert f"{run} (gain {gain:+.3f}, forgetting {drop:+.3f})" in md
    front = {p.run for p in pareto_front(points)}
    assert "On the Pareto front" in md and all(name in md.split("On the Pareto front")[1] for name in front)


def test_pareto_front_keeps_only_unbeaten_runs() -> None:
    points = [Point("a", 0.1, 0.5), Point("b", 0.2, 0.4), Point("c", 0.0, 0.1), Point("d", 0.3, 0.6)]
    assert [p.run for p in pareto_front(points)] == ["c", "a", "d"]  # b: a forgets less and gains more


def test_a_set_added_later_scores_the_saved_models_without_retraining(finished: Path) -> None:
    import yaml

    path = finished.parent.parent / "exp.yaml"
    exp = yaml.safe_load(path.read_text())
    exp["evaluate"]["forgetting"]["wiki_short"] = {
        "source": str(path.parent / "wiki.jsonl"),
        "task": "lm_text",
        "limit": 2,
    }
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    before = {run: (finished / run / "metrics.json").read_bytes() for run in RUNS}
    lines: list[str] = []
    assert run_experiment(load_experiment(path), executor="inline", log=lines.append) == EXIT_OK, lines
    assert sum("done already: skipped" in line for line in lines) == len(RUNS)  # nothing retrained
    for run in RUNS:
        assert (finished / run / "metrics.json").read_bytes() == before[run]  # the integrity-checked files stay
        added = json.loads((finished / run / "forgetting.json").read_text())["sets"]
        assert set(added) == {"wiki_short"} and added["wiki_short"]["n"] == 2
        entry = added["wiki_short"]
        assert entry["change"]["cross_entropy"] == entry["run"]["cross_entropy"] - entry["base"]["cross_entropy"]
    assert "wiki_short cross_entropy" in (finished / "report.md").read_text()
    from peftlab.store import ExperimentDir

    assert ExperimentDir(finished).damaged() == {}
    lines.clear()  # a third run has nothing left to score
    assert run_experiment(load_experiment(path), executor="inline", log=lines.append) == EXIT_OK
    assert not any("scoring the saved model" in line for line in lines)
