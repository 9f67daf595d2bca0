"""Extractive QA on the real offline assets: all-MiniLM-L6-v2 on wnut16-qa, small limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.config import load_experiment
from peftlab.errors import EXIT_OK
from peftlab.experiment import run_experiment
from tests.conftest import write_experiment

pytestmark = pytest.mark.integration


def test_minilm_on_wnut16_qa_trains_and_reports(tmp_path: Path) -> None:
    from peftlab import assets

    for name in ("minilm-l6", "wnut16-qa"):
        assets.fetch(name, log=lambda m: None)
    exp = {
        "name": "qa-real",
        "model": "asset:minilm-l6",
        "task": {"name": "qa", "doc_stride": 16},
        "data": {"source": "asset:wnut16-qa", "limits": {"train": 32, "validation": 16, "test": 16}, "max_length": 48},
        "methods": {"lora": {"r": 8}},
        "train": {"epochs": 1, "batch_size": 16},
        "evaluate": {"splits": ["test"], "baselines": False},
        "output_dir": str(tmp_path / "runs"),
    }
    code = run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=lambda m: None)
    assert code == EXIT_OK
    metrics = json.loads((tmp_path / "runs" / "qa-real" / "lora" / "metrics.json").read_text())
    # LoRA r=8 on query/value of MiniLM's 6 layers (hidden 384) + the span head qa_outputs (384 x 2 + 2)
    assert metrics["params"]["trainable"] == 6 * 2 * (384 * 8 + 8 * 384) + 384 * 2 + 2
    assert metrics["eval"]["test"]["n"] == 16 and 0 <= metrics["eval"]["test"]["f1"] <= 100
    assert metrics["train"]["train_sequences"] > metrics["train"]["train_examples"] == 32  # some tweets need 2 windows
