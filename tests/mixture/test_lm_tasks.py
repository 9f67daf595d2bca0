"""Mixtures of decoder experts on a tiny random Llama: a generation task (answers generated token by token
through the mixture) beside a causal classification task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from peftlab.config import TrainSpec, load_experiment
from peftlab.errors import EXIT_OK
from peftlab.experiment import run_experiment
from peftlab.mixture.experts import read_expert
from peftlab.mixture.model import build_mixture
from peftlab.mixture.run import _base, load_mixture, predict, task_data
from peftlab.mixture.settings import MixtureSpec
from peftlab.store import read_jsonl
from peftlab.trained import load_run
from tests.conftest import DATA, write_experiment
from tests.tasks.test_causal_classification import ONE_TOKEN, TINY_LLAMA
from tests.tasks.test_lm_generation import rows

PREDICT = TrainSpec(batch_size=4, lr=1e-3, precision="fp32")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two LoRA experts (generation, classification) and a global-gate mixture of them, trained once."""
    tmp = tmp_path_factory.mktemp("lm_mixture")
    data = tmp / "qa"
    data.mkdir()
    for split, n in (("train", 24), ("validation", 6), ("test", 6)):
        lines = [json.dumps({**r, "id": f"{split}-{r['id']}"}) for r in rows(n)]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    exp = {
        "name": "lm",
        "models": {"llama": TINY_LLAMA},
        "tasks": [
            {
                "key": "gen",
                "task": {"name": "lm_generation", "max_new_tokens": 4},
                "data": {"source": str(data), "max_length": 48},
            },
            {
                "key": "cls",
                "task": {"name": "causal_classification", "verbalizers": ONE_TOKEN},
                "data": {"source": str(DATA / "tiny_cls"), "max_length": 48},
            },
        ],
        "methods": {"lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]}},
        "train": {"epochs": 1, "batch_size": 8, "precision": "fp32"},
        "output_dir": str(tmp / "runs"),
        "mixtures": {
            "m": {
                "experts": "lora",
                "gate": "global",
                "train": {"epochs": 1, "limit": 16, "batch_size": 8},
                "evaluate": {"limit": 6, "merges": ["linear"]},
            }
        },
    }
    lines: list[str] = []
    code = run_experiment(load_experiment(write_experiment(tmp, exp)), executor="inline", log=lines.append)
    assert code == EXIT_OK, lines
    return tmp / "runs" / "lm"


def _experts(root: Path) -> list[Any]:
    return [read_expert(root / f"llama.{key}.lora") for key in ("gen", "cls")]


@pytest.mark.parametrize("gate", ["layerwise", "global"])
def test_a_one_hot_mix_generates_exactly_what_its_expert_generates(finished: Path, gate: str) -> None:
    experts = _experts(finished)
    source, tokenizer = _base(experts)
    spec = MixtureSpec(experts="lora", gate=gate, evaluate={"limit": 6})
    mixture = build_mixture(experts, spec, source, tokenizer, 0)
    for i, expert in enumerate(experts):
        d = task_data(expert, spec, tokenizer, finished)
        with mixture.fixed([1.0 if j == i else 0.0 for j in range(len(experts))]):
            _, got = predict(mixture, expert.name, d, tokenizer, PREDICT, "fp32")
        run = load_run(expert.folder)
        outputs, _ = d.task.model_outputs(run.model, d.features, tokenizer, PREDICT, "fp32")
        expected = d.task.predict(outputs, d.examples, d.features)
        assert [p["prediction"] for p in got] == [p["prediction"] for p in expected], expert.name
    assert any(p["prediction"] for p in got)  # something was generated or chosen, not empty strings


def test_a_reloaded_global_gate_mixture_generates_its_saved_predictions(finished: Path) -> None:
    """The global gate cannot use a KV cache: generation reruns the sequence; the result must still be
    what the mixture predicted after training."""
    folder = finished / "_mixtures" / "m"
    mixture = load_mixture(folder)
    experts = _experts(finished)
    _, tokenizer = _base(experts)
    spec = MixtureSpec(experts="lora", gate="global", evaluate={"limit": 6})
    d = task_data(experts[0], spec, tokenizer, finished)
    _, again = predict(mixture, "gen", d, tokenizer, PREDICT, "fp32")
    saved = read_jsonl(folder / "predictions" / "gen.jsonl")
    assert [p["prediction"] for p in again] == [p["prediction"] for p in saved]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(metrics["scores"]["learned gate"]) == {"gen", "cls"}
    assert metrics["inference"]["gen"]["expert_score"] == metrics["scores"]["expert gen"]["gen"]["exact_match"]
