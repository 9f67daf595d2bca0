"""A mixture's run (peftlab.mixture.run): what a finished `_mixtures/<name>/` holds, reloading it, and a
changed or missing expert on reload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftlab.config import TrainSpec, load_experiment
from peftlab.errors import EXIT_OK, InputError
from peftlab.experiment import run_experiment
from peftlab.integrity import sha256_file
from peftlab.mixture.experts import read_expert
from peftlab.mixture.gate import gate_parameter_count
from peftlab.mixture.run import load_mixture, predict, task_data
from peftlab.mixture.settings import FOLDER, LEARNED, UNIFORM, MixtureSpec
from peftlab.store import DONE, RunDir, read_jsonl
from tests.conftest import write_experiment
from tests.mixture.conftest import MIXTURES, TASKS, Finished, expert_experiment, tokenizer_of

HEAD = "base_model.model."


def metrics_of(finished: Finished, name: str) -> dict:
    return json.loads((finished.mixture(name) / "metrics.json").read_text())


def expected_configurations(name: str) -> dict[str, str]:
    spec = MixtureSpec.model_validate(MIXTURES[name])
    tasks = list(TASKS) if spec.experts == "lora" else [e.split(".")[1] for e in spec.experts]
    kinds = {LEARNED: "mixture", UNIFORM: "baseline", **{f"expert {t}": "expert" for t in tasks}}
    kinds |= {f"merge {m}": "merge" for m in spec.evaluate.merges}
    if spec.evaluate.ablation:
        kinds |= {f"without {t}": "ablation" for t in tasks}
    return kinds


def test_the_experiment_and_its_mixtures_finish(finished: Finished) -> None:
    assert finished.rc == EXIT_OK, "\n".join(finished.log[-30:])
    for name in MIXTURES:
        folder = RunDir(finished.mixture(name))
        assert folder.status()["state"] == DONE and folder.damage() is None
        adapter = folder.adapter_dir
        assert {p.name for p in adapter.iterdir()} >= {"gate.safetensors", "heads.safetensors", "mixture.json"}
        assert (adapter / "experts.safetensors").exists() == MIXTURES[name].get("train_experts", False)


@pytest.mark.parametrize("name", list(MIXTURES))
def test_metrics_hold_every_configuration_on_every_task(finished: Finished, name: str) -> None:
    metrics = metrics_of(finished, name)
    kinds = expected_configurations(name)
    tasks = [e["name"] for e in metrics["experts"]]
    assert metrics["kinds"] == kinds and metrics["failed"] == {}
    assert list(metrics["scores"]) == list(kinds)
    for configuration, per_task in metrics["scores"].items():
        assert sorted(per_task) == sorted(tasks), configuration
        for entry in metrics["experts"]:
            score = per_task[entry["name"]][entry["primary_metric"]]
            assert 0 <= score <= 1, (configuration, entry["name"])
    spec = MixtureSpec.model_validate(MIXTURES[name])
    for entry in metrics["experts"]:
        assert entry["examples"] == spec.evaluate.limit and entry["split"] == "test"
        assert entry["sha256"] == sha256_file(Path(entry["folder"]) / "adapter" / "adapter_model.safetensors")
        assert metrics["train"]["examples"][entry["name"]] == spec.train.limit
    steps = len(tasks) * -(-spec.train.limit // spec.train.batch_size)
    assert metrics["train"]["steps"] == steps and metrics["train"]["history"][-1]["step"] == steps
    assert set(metrics["gate"]) == set(tasks) and len(metrics["layers"]) == 4  # query, value x 2 layers


@pytest.mark.parametrize("name", ["gate", "top2"])
def test_only_the_gate_is_trainable_and_counts_as_the_formula(finished: Finished, name: str) -> None:
    metrics = metrics_of(finished, name)
    params, spec = metrics["params"], MixtureSpec.model_validate(MIXTURES[name])
    assert params["trainable"] == params["gate"] > 0
    experts = len(metrics["experts"])
    formula = gate_parameter_count(
        [32] * len(metrics["layers"]), experts, spec.depth, spec.gate_size, global_from=32 if name == "top2" else None
    )
    assert params["gate"] == formula
    assert params["experts"] == experts * len(metrics["layers"]) * 2 * 4 * 32  # A and B: rank 4, width 32


def test_training_the_experts_makes_their_matrices_trainable(finished: Finished) -> None:
    params = metrics_of(finished, "tuned")["params"]
    assert params["trainable"] == params["gate"] + params["experts"]


@pytest.mark.parametrize("name", ["gate", "top2"])
def test_each_expert_alone_scores_as_its_own_run(finished: Finished, name: str) -> None:
    """The one-hot mix is the expert: its score equals the expert run reloaded alone on the same examples."""
    metrics = metrics_of(finished, name)
    for entry in metrics["experts"]:
        task = entry["name"]
        alone = metrics["inference"][task]["expert_score"]
        assert metrics["scores"][f"expert {task}"][task][entry["primary_metric"]] == alone, task


@pytest.mark.parametrize("name", list(MIXTURES))
def test_gate_summary_is_a_distribution_per_layer(finished: Finished, name: str) -> None:
    metrics = metrics_of(finished, name)
    experts = len(metrics["experts"])
    for task, summary in metrics["gate"].items():
        assert len(summary["weights"]) == len(metrics["layers"])
        for row in summary["weights"]:
            assert len(row) == experts and sum(row) == pytest.approx(1, abs=1e-5), task
        assert all(0 <= e <= 1 + 1e-6 for e in summary["entropy"]) and summary["tokens"] > 0
        own = [e["name"] for e in metrics["experts"]].index(task)
        mean_own = sum(row[own] for row in summary["weights"]) / len(summary["weights"])
        assert summary["own_share"] == pytest.approx(mean_own, abs=1e-5)


@pytest.mark.parametrize("name", list(MIXTURES))
def test_reloaded_mixture_predicts_what_was_saved(finished: Finished, name: str) -> None:
    folder = finished.mixture(name)
    metrics = metrics_of(finished, name)
    mixture = load_mixture(folder)
    spec = mixture.spec
    saved_gate = load_file(str(folder / "adapter" / "gate.safetensors"))
    state = mixture.gate.state_dict()
    assert state.keys() == saved_gate.keys() and all(torch.equal(state[k], v) for k, v in saved_gate.items())
    assert any(bool(v.any()) for k, v in saved_gate.items()), "the saved gate is still all zero"
    experts = [read_expert(Path(e["folder"])) for e in metrics["experts"]]
    tokenizer = tokenizer_of(experts[0].folder)
    predict_spec = TrainSpec(
        batch_size=spec.train.batch_size, lr=spec.train.lr, precision=metrics["precision"], seed=spec.train.seed
    )
    for expert in experts:
        data = task_data(expert, spec, tokenizer, finished.base)
        scores, predictions = predict(mixture, expert.name, data, tokenizer, predict_spec, metrics["precision"])
        assert predictions == read_jsonl(folder / "predictions" / f"{expert.name}.jsonl"), expert.name
        saved = dict(metrics["scores"][LEARNED][expert.name])
        scores.pop("eval_seconds"), saved.pop("eval_seconds")
        assert scores == saved, expert.name


@pytest.mark.parametrize("name", ["gate", "tuned"])
def test_saved_heads_are_the_experts_heads(finished: Finished, name: str) -> None:
    heads = load_file(str(finished.mixture(name) / "adapter" / "heads.safetensors"))
    metrics = metrics_of(finished, name)
    for entry in metrics["experts"]:
        own = load_file(str(Path(entry["folder"]) / "adapter" / "adapter_model.safetensors"))
        expected = {k.removeprefix(HEAD): v for k, v in own.items() if "lora_" not in k}
        got = {k.split("/", 1)[1]: v for k, v in heads.items() if k.startswith(f"{entry['name']}/")}
        assert got.keys() == expected.keys() and expected, entry["name"]
        assert all(torch.equal(got[k], expected[k]) for k in expected), entry["name"]


def _lora_of(mixture, expert: str, prefix: str = "bert") -> dict[str, torch.Tensor]:
    """The mixture's LoRA matrices of one expert, keyed as the expert's adapter file keys them."""
    return {
        f"{HEAD}{prefix}.{layer_name}.{part}.weight": getattr(layer, part)[expert].weight.detach()
        for layer_name, layer in mixture.layers
        for part in ("lora_A", "lora_B")
    }


def test_reloaded_frozen_experts_are_bit_identical_to_their_runs(finished: Finished) -> None:
    mixture = load_mixture(finished.mixture("gate"))
    for task, folder in finished.experts.items():
        own = {
            k: v for k, v in load_file(str(folder / "adapter" / "adapter_model.safetensors")).items() if "lora_" in k
        }
        got = _lora_of(mixture, task)
        assert got.keys() == own.keys()
        assert all(torch.equal(got[k], own[k]) for k in own), task


def test_trained_experts_are_saved_and_reloaded(finished: Finished) -> None:
    folder = finished.mixture("tuned")
    saved = load_file(str(folder / "adapter" / "experts.safetensors"))
    mixture = load_mixture(folder)
    layers = dict(mixture.layers)
    for key, value in saved.items():
        expert, rest = key.split("/", 1)
        layer, part = rest.rsplit(".", 1)
        assert torch.equal(getattr(layers[layer], part)[expert].weight, value), key
    for task in ("wnut", "sentiment"):
        own = load_file(str(finished.experts[task] / "adapter" / "adapter_model.safetensors"))
        got = _lora_of(mixture, task)
        assert any(not torch.equal(got[k], own[k]) for k in got), f"{task}: training left its matrices unchanged"


def test_a_second_run_reuses_the_finished_mixtures(finished: Finished) -> None:
    before = {name: (finished.mixture(name) / "metrics.json").read_text() for name in MIXTURES}
    exp = expert_experiment(finished.base, mixtures=MIXTURES)
    log: list[str] = []
    rc = run_experiment(load_experiment(write_experiment(finished.base, exp)), executor="inline", log=log.append)
    assert rc == EXIT_OK
    for name in MIXTURES:
        assert f"[mixture {name}] done already: skipped" in log
        assert (finished.mixture(name) / "metrics.json").read_text() == before[name]
    assert not [p for p in (finished.root / FOLDER).iterdir() if ".replaced-" in p.name]


# --- a changed or missing expert ---------------------------------------------------------------


@pytest.fixture
def copied(finished: Finished, tmp_path: Path) -> Path:
    """A copy of the finished experiment whose mixture `gate` names the copied experts."""
    root = tmp_path / "multi"
    shutil.copytree(finished.root, root)
    record_file = root / FOLDER / "gate" / "adapter" / "mixture.json"
    record = json.loads(record_file.read_text())
    for ref in record["experts"]:
        ref["folder"] = str(root / Path(ref["folder"]).name)
    record_file.write_text(json.dumps(record))
    return root


def test_a_changed_expert_is_an_error_naming_it(copied: Path) -> None:
    weights = copied / "tiny.multiple_choice.lora" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, str(weights))
    with pytest.raises(InputError, match=r"expert 'multiple_choice' .*changed since the mixture was trained"):
        load_mixture(copied / FOLDER / "gate")


def test_a_missing_expert_is_an_error_naming_it(copied: Path) -> None:
    shutil.rmtree(copied / "tiny.sentiment.lora")
    with pytest.raises(InputError, match=r"expert 'sentiment' .*is missing"):
        load_mixture(copied / FOLDER / "gate")
