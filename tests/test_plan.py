"""`plan`: exact parameter counts without weights or training, and the memory estimate."""

from __future__ import annotations

from pathlib import Path

from peftlab.config import load_experiment
from peftlab.plan import format_plan, plan_experiment
from tests.conftest import tiny_experiment, write_experiment


def plan(tmp_path: Path, **changes) -> list:
    exp = load_experiment(write_experiment(tmp_path, tiny_experiment(tmp_path, **changes)))
    return plan_experiment(exp, log=lambda m: None)


def test_plan_distilbert_base_counts_exactly(tmp_path: Path) -> None:
    model = {"arch": "distilbert", "random_init": True, "base": "distilbert-base-uncased"}
    rows = {r.run: r for r in plan(tmp_path, model=model, methods={"full": {}, "lora": {"r": 16}})}
    # DistilBERT-base with a 3-label head: 66,955,779 weights (hub checkpoint: 66,362,880 + head)
    assert rows["full"].trainable == rows["full"].total == 66_955_779
    # LoRA r=16 on q_lin/v_lin: 6 layers x 2 x (768x16 + 16x768) + pre_classifier 768x768+768 + classifier 768x3+3
    assert rows["lora"].trainable == 6 * 2 * 2 * 768 * 16 + 768 * 768 + 768 + 768 * 3 + 3
    # PEFT's total also counts the copy of the head that modules_to_save trains beside the original
    head = 768 * 768 + 768 + 768 * 3 + 3
    assert rows["lora"].total == 66_955_779 + 6 * 2 * 2 * 768 * 16 + head


def test_plan_llama_from_known_config_without_allocating(tmp_path: Path) -> None:
    model = {"arch": "llama", "random_init": True, "base": "meta-llama/Llama-3.2-1B"}
    task = {"name": "classification", "labels": ["negative", "neutral", "positive"]}
    rows = plan(tmp_path, model=model, task=task, methods={"full": {}})
    # Llama 3.2 1B: 1,235,814,400 weights with tied embeddings; the 3-way score head adds 2048 x 3
    assert rows[0].total == 1_235_814_400 + 2048 * 3


def test_memory_estimate_parts_and_ordering(tmp_path: Path) -> None:
    rows = {r.run: r for r in plan(tmp_path)}
    full, lora = rows["full"].memory_mib, rows["lora"].memory_mib
    assert (
        full["total"] == round(sum(v for k, v in full.items() if k != "total"), 1)
        or abs(full["total"] - sum(v for k, v in full.items() if k != "total")) < 0.5
    )
    assert full["optimizer"] > lora["optimizer"] and full["gradients"] > lora["gradients"]
    assert full["activations"] == lora["activations"]
    assert "resolved settings:" in format_plan(list(rows.values()))
