"""Shared fixtures: tiny experiments on tiny random models (no download), and the real assets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

DATA = Path(__file__).parent / "data"
TINY_BERT = {
    "arch": "bert",
    "random_init": True,
    "config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
}

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_experiment(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    """A tiny classification experiment writing its runs under tmp_path (override any section)."""
    exp: dict[str, Any] = {
        "name": "tiny",
        "model": TINY_BERT,
        "task": "classification",
        "data": {"source": str(DATA / "tiny_cls"), "max_length": 32},
        "methods": {"full": {}, "lora": {"r": 4}, "ia3": {}},
        "train": {"epochs": 2, "batch_size": 8, "precision": "fp32"},
        "output_dir": str(tmp_path / "runs"),
    }
    exp.update(changes)
    return exp


def write_experiment(tmp_path: Path, exp: dict[str, Any], name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Any]:
    return tiny_experiment(tmp_path)


@pytest.fixture(scope="session")
def real_assets() -> None:
    """Fetch the real offline assets the integration tests use (a no-op once cached)."""
    from peftlab import assets

    for name in ("minilm-l6", "tweets-3way"):
        assets.fetch(name, log=lambda m: None)
