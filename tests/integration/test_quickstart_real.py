"""The real offline assets: all-MiniLM-L6-v2 on tweets-3way, small limits (about a minute)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.config import load_experiment
from peftlab.errors import EXIT_OK
from peftlab.experiment import run_experiment
from tests.conftest import write_experiment

pytestmark = pytest.mark.integration


def test_minilm_on_tweets_trains_and_reports(tmp_path: Path, real_assets: None) -> None:
    exp = {
        "name": "real",
        "model": "asset:minilm-l6",
        "task": "classification",
        "data": {
            "source": "asset:tweets-3way",
            "limits": {"train": 96, "validation": 32, "test": 32},
            "max_length": 48,
        },
        "methods": {"lora": {"r": 8}, "ia3": {}},
        "train": {"epochs": 1, "batch_size": 16},
        "output_dir": str(tmp_path / "runs"),
    }
    assert (
        run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=lambda m: None)
        == EXIT_OK
    )
    root = tmp_path / "runs" / "real"
    lora = json.loads((root / "lora" / "metrics.json").read_text())
    # MiniLM-L6: 22,713,216 backbone weights (+ 3-way head 1,155); LoRA r=8 on query/value of 6 layers
    assert lora["params"]["trainable"] == 6 * 2 * (384 * 8 + 8 * 384) + 384 * 3 + 3
    assert lora["eval"]["test"]["n"] == 32
    baselines = json.loads((root / "_baselines" / "metrics.json").read_text())["baselines"]
    assert set(baselines) == {"majority class", "untrained model"}
    data = json.loads((root / "data.json").read_text())
    assert data["train"]["n"] == 96 and set(data["train"]["labels"]) == {"negative", "neutral", "positive"}
    assert (root / "report.html").stat().st_size > 10_000
