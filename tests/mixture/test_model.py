"""The mixture model (peftlab.mixture.model): a one-hot gate is exactly its expert, on encoders (BERT,
DistilBERT) and a decoder (Llama), multiple choice and token classification included; the fixed mixes
and the learned gate differ from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peftlab.config import TrainSpec, load_experiment
from peftlab.errors import EXIT_OK
from peftlab.experiment import run_experiment
from peftlab.mixture.experts import check_experts, read_expert
from peftlab.mixture.model import Mixture, build_mixture, parameter_counts
from peftlab.mixture.run import TaskData, load_mixture, task_data
from peftlab.mixture.settings import MixtureSpec
from peftlab.models import resolve_model
from peftlab.trained import load_run
from tests.conftest import DATA, write_experiment
from tests.mixture.conftest import EXPERT_TRAIN, Finished, outputs_equal, tokenizer_of
from tests.tasks.test_causal_classification import ONE_TOKEN, TINY_LLAMA

TINY_DISTILBERT = {
    "arch": "distilbert",
    "random_init": True,
    "config": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64},
}
SPEC = MixtureSpec(experts="lora", evaluate={"limit": 6})
PREDICT = TrainSpec(batch_size=4, lr=1e-3, precision="fp32")


class Built:
    """A mixture of some finished experts, with what scoring it needs."""

    def __init__(self, mixture: Mixture, folders: list[Path], base: Path) -> None:
        self.mixture = mixture
        self.experts = [read_expert(p) for p in folders]
        self.tokenizer = tokenizer_of(folders[0])
        self.data = {e.name: task_data(e, SPEC, self.tokenizer, base) for e in self.experts}

    def outputs(self, model: torch.nn.Module, task: str) -> object:
        d = self.data[task]
        return d.task.model_outputs(model, d.features, self.tokenizer, PREDICT, "fp32")[0]

    def predictions(self, outputs: object, task: str) -> list[dict]:
        d: TaskData = self.data[task]
        return d.task.predict(outputs, d.examples, d.features)

    def one_hot(self, task: str) -> list[float]:
        return [1.0 if e.name == task else 0.0 for e in self.experts]


def train_experts(tmp_path: Path, model: dict, tasks: list[dict], lora: dict) -> list[Path]:
    exp = {
        "name": "experts",
        "models": {"m": model},
        "tasks": tasks,
        "methods": {"lora": lora},
        "train": dict(EXPERT_TRAIN),
        "evaluate": {"baselines": False},
        "output_dir": str(tmp_path / "runs"),
    }
    log: list[str] = []
    rc = run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=log.append)
    assert rc == EXIT_OK, "\n".join(log[-20:])
    return [tmp_path / "runs" / "experts" / f"m.{t['key']}.lora" for t in tasks]


def fresh_mixture(folders: list[Path], base: Path) -> Built:
    experts = [read_expert(p) for p in folders]
    check_experts(experts)
    mixture = build_mixture(experts, SPEC, resolve_model(experts[0].config["model"]), tokenizer_of(folders[0]), 0)
    return Built(mixture.eval(), folders, base)


LIMITS = {"train": 16, "validation": 4, "test": 6}


@pytest.fixture(scope="module")
def bert(finished: Finished) -> Built:
    """The package's learned layerwise mixture, reloaded (a trained gate: the one-hot mix must ignore it)."""
    return Built(load_mixture(finished.mixture("gate")), list(finished.experts.values()), finished.base)


@pytest.fixture(scope="module")
def bert_global(finished: Finished) -> Built:
    return Built(load_mixture(finished.mixture("top2")), list(finished.experts.values()), finished.base)


@pytest.fixture(scope="module")
def distilbert(tmp_path_factory: pytest.TempPathFactory) -> Built:
    tmp_path = tmp_path_factory.mktemp("distilbert")
    tasks = [
        {"key": "wnut", "task": "ner", "data": {"source": str(DATA / "tiny_ner"), "max_length": 32, "limits": LIMITS}},
        {
            "key": "sentiment",
            "task": "classification",
            "data": {"source": str(DATA / "tiny_cls"), "max_length": 32, "limits": LIMITS},
        },
    ]
    return fresh_mixture(train_experts(tmp_path, TINY_DISTILBERT, tasks, {"r": 4}), tmp_path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Two causal_classification experts: verbalizers scored by the LM head, and a linear head."""
    tmp_path = tmp_path_factory.mktemp("llama")
    data = {"source": str(DATA / "tiny_cls"), "max_length": 48, "limits": LIMITS}
    task = {"name": "causal_classification", "prompt": "review: {text} sentiment:"}
    tasks = [
        {"key": "verbal", "task": {**task, "verbalizers": ONE_TOKEN}, "data": data},
        {"key": "linear", "task": {**task, "head": "linear"}, "data": data},
    ]
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    return fresh_mixture(train_experts(tmp_path, TINY_LLAMA, tasks, lora), tmp_path)


CASES = [
    ("bert", "wnut"),
    ("bert", "multiple_choice"),
    ("bert", "sentiment"),
    ("bert_global", "multiple_choice"),
    ("distilbert", "wnut"),
    ("distilbert", "sentiment"),
    ("llama", "verbal"),
    ("llama", "linear"),
]


@pytest.mark.parametrize(("model", "task"), CASES)
def test_a_one_hot_gate_is_exactly_its_expert(request: pytest.FixtureRequest, model: str, task: str) -> None:
    built: Built = request.getfixturevalue(model)
    expert = next(e for e in built.experts if e.name == task)
    run = load_run(expert.folder)
    alone = built.outputs(run.model, task)
    view = built.mixture.view(task)
    with built.mixture.fixed(built.one_hot(task)):
        mixed = built.outputs(view, task)
    assert outputs_equal(mixed, alone)
    assert built.predictions(mixed, task) == built.predictions(alone, task)
    # the check can fail: the other experts, their uniform mix and the learned gate give other outputs
    n = len(built.experts)
    for other in (e.name for e in built.experts if e.name != task):
        with built.mixture.fixed(built.one_hot(other)):
            assert not outputs_equal(built.outputs(view, task), alone), other
    with built.mixture.fixed([1 / n] * n):
        assert not outputs_equal(built.outputs(view, task), alone)


def test_the_learned_gate_is_neither_an_expert_nor_the_uniform_mix(bert: Built) -> None:
    view = bert.mixture.view("sentiment")
    learned = bert.outputs(view, "sentiment")
    with bert.mixture.fixed([1 / 3] * 3):
        assert not outputs_equal(bert.outputs(view, "sentiment"), learned)
    with bert.mixture.fixed(bert.one_hot("sentiment")):
        assert not outputs_equal(bert.outputs(view, "sentiment"), learned)


def test_a_fixed_mix_is_undone_after_its_block(bert: Built) -> None:
    view = bert.mixture.view("multiple_choice")
    before = bert.outputs(view, "multiple_choice")
    with bert.mixture.fixed(bert.one_hot("wnut")):
        pass
    with bert.mixture.masked(0):
        assert not outputs_equal(bert.outputs(view, "multiple_choice"), before)
    assert bert.mixture.state.fixed is None and bert.mixture.state.masked == frozenset()
    assert outputs_equal(bert.outputs(view, "multiple_choice"), before)


def test_masking_an_expert_gives_it_no_weight(bert: Built) -> None:
    """The ablation: the learned gate without one expert is the gate over the others (weight exactly 0)."""
    mixture, d = bert.mixture, bert.data["sentiment"]
    rows = d.task.model_inputs(d.features)
    batch = d.task.collator(bert.tokenizer)([rows[i] for i in range(len(rows))])
    with torch.no_grad(), mixture.masked(1):
        mixture.view("sentiment")(**batch)
    weights = [mixture.state.current[i] for i in range(len(mixture.layers))]
    for w in weights:
        assert bool((w[..., 1] == 0).all()) and torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]))
        assert bool((w[..., 0] > 0).all() and (w[..., 2] > 0).all())


def test_a_merge_is_undone_after_its_block(bert: Built) -> None:
    view = bert.mixture.view("wnut")
    before = bert.outputs(view, "wnut")
    trainable = parameter_counts(bert.mixture)["trainable"]
    with bert.mixture.merged("linear", 0.5):
        merged = bert.outputs(view, "wnut")
    assert not outputs_equal(merged, before)
    assert outputs_equal(bert.outputs(view, "wnut"), before)
    assert "merged" not in bert.mixture.peft.peft_config and parameter_counts(bert.mixture)["trainable"] == trainable
