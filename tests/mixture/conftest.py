"""Shared fixtures of the mixture tests: one tiny multi-task experiment (tiny BERT; ner, multiple choice and
classification) whose LoRA experts and three mixtures train once for the whole package."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from peftlab.config import load_experiment
from peftlab.experiment import run_experiment
from peftlab.mixture.settings import FOLDER
from tests.conftest import write_experiment
from tests.test_multitask import multitask

TASKS = ("wnut", "multiple_choice", "sentiment")  # the task keys of tests.test_multitask.multitask
# Experts: two optimizer steps at a high rate, so that every expert's LoRA update is far from zero and
# from the others' (a one-hot gate that picked the wrong expert would show).
EXPERT_TRAIN = {"epochs": 1, "max_steps": 2, "batch_size": 8, "lr": 0.01, "precision": "fp32"}
LIMITS = {"train": 16, "validation": 4, "test": 8}
MIXTURES: dict[str, dict[str, Any]] = {
    # layerwise gate (the default), depth 1: 6 gate steps (3 tasks x 8 examples / batches of 4)
    "gate": {
        "experts": "lora",
        "train": {"limit": 8, "batch_size": 4, "lr": 0.01},
        "evaluate": {"limit": 6, "merges": ["linear", "svd"]},
    },
    # X-LoRA's global gate, two layers wide 8, top 2 of 3 experts
    "top2": {
        "experts": "lora",
        "gate": "global",
        "top_k": 2,
        "depth": 2,
        "gate_size": 8,
        "train": {"limit": 4, "batch_size": 4, "lr": 0.01},
        "evaluate": {"limit": 4, "merges": ["cat"]},
    },
    # the experts' LoRA matrices train too (saved in experts.safetensors)
    "tuned": {
        "experts": ["tiny.wnut.lora", "tiny.sentiment.lora"],
        "train_experts": True,
        "train": {"limit": 4, "batch_size": 4, "lr": 0.01},
        "evaluate": {"limit": 4, "merges": [], "ablation": False},
    },
}


def expert_experiment(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    """The multi-task experiment with one LoRA entry (rank 4), tiny splits and two-step training."""
    exp = multitask(tmp_path, methods={"lora": {"r": 4}}, train=dict(EXPERT_TRAIN), evaluate={"baselines": False})
    for entry in exp["tasks"]:
        entry["data"]["limits"] = dict(LIMITS)
    exp.update(changes)
    return exp


@dataclass
class Finished:
    """A finished experiment: its folder, its experts (task key -> run folder), its log and exit code."""

    base: Path  # the folder of the experiment file
    root: Path  # runs/<experiment>
    rc: int
    log: list[str]

    @property
    def experts(self) -> dict[str, Path]:
        return {task: self.root / f"tiny.{task}.lora" for task in TASKS}

    def mixture(self, name: str) -> Path:
        return self.root / FOLDER / name


@pytest.fixture(scope="package")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    tmp_path = tmp_path_factory.mktemp("mixture")
    exp = expert_experiment(tmp_path, mixtures=MIXTURES)
    log: list[str] = []
    rc = run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=log.append)
    return Finished(tmp_path, tmp_path / "runs" / "multi", rc, log)


def tokenizer_of(folder: Path) -> Any:
    """The tokenizer a finished run saved beside its adapter (what the mixture uses)."""
    from transformers import AutoTokenizer

    from peftlab.models import ensure_pad_token

    return ensure_pad_token(AutoTokenizer.from_pretrained(folder / "adapter"))


def outputs_equal(a: Any, b: Any) -> bool:
    """Raw model outputs (an array, or nested tuples of arrays) bit-identical."""
    import numpy as np

    if isinstance(a, tuple | list):
        return isinstance(b, tuple | list) and len(a) == len(b) and all(map(outputs_equal, a, b))
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool(np.array_equal(a, b))
