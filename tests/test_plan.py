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


def test_plan_of_the_lora_vs_ia3_squad_study_counts_its_table_2(capsys) -> None:
    """The study's config: DistilBERT from peftlab's table (no hub, no data), its trainable counts exactly."""
    paper = Path(__file__).parent.parent / "configs" / "papers" / "lora_vs_ia3_squad.yaml"
    notes: list[str] = []
    rows = {r.run: r for r in plan_experiment(load_experiment(paper), log=notes.append)}
    # LoRA r=16 on q_lin, v_lin of 6 layers: 6 x 2 x (768 x 16 + 16 x 768) + qa_outputs (768 x 2 + 2)
    assert rows["lora"].trainable == 6 * 2 * 2 * 768 * 16 + 768 * 2 + 2 == 296_450
    # (IA)3 vectors on the outputs of q, k, v, out_lin (768 each), lin1 (3072), lin2 (768), 6 layers + qa_outputs
    assert rows["ia3"].trainable == 6 * (4 * 768 + 3072 + 768) + 768 * 2 + 2 == 43_010
    assert any("built-in configuration of distilbert-base-uncased" in n for n in notes)
    assert not any("data not readable" in n for n in notes)  # the span head needs no data: squad is not read
    from peftlab.cli import main

    assert main(["plan", str(paper)]) == 0
    out = capsys.readouterr().out
    assert "296,450" in out and "43,010" in out


def test_task_default_max_length(tmp_path: Path) -> None:
    qa = load_experiment(write_experiment(tmp_path, tiny_experiment(tmp_path, task="qa", data={"source": "x.jsonl"})))
    assert qa.spec.data.max_length == 256
    cls = load_experiment(write_experiment(tmp_path, tiny_experiment(tmp_path, data={"source": "x.jsonl"})))
    assert cls.spec.data.max_length == 128


def test_plan_llama32_1b_ia3_and_qlora_as_in_the_study(tmp_path: Path) -> None:
    """The (IA)3-vs-QLoRA study's two runs on Llama 3.2 1B: exact counts, 4-bit weights in the estimate."""
    model = {"arch": "llama", "random_init": True, "base": "meta-llama/Llama-3.2-1B"}
    task = {"name": "causal_classification"}  # labels from the data: negative, neutral, positive
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    methods = {
        "ia3": {"target_modules": [m for m in linear if m != "v_proj"], "feedforward_modules": ["down_proj"]},
        "qlora": {"method": "lora", "quantize": "nf4", "r": 16, "target_modules": linear},
        "lora": {"r": 16, "target_modules": linear},
    }
    rows = {r.run: r for r in plan(tmp_path, model=model, task=task, methods=methods)}
    base = 1_235_814_400  # Llama 3.2 1B, tied embeddings: the LM head adds nothing
    # (IA)3 per layer: q 2048 + k 512 + o 2048 + gate 8192 + up 8192 outputs, down's 8192 inputs; 16 layers
    assert rows["ia3"].trainable == 16 * (2048 + 512 + 2048 + 8192 + 8192 + 8192) == 466_944
    assert rows["ia3"].total == base + 466_944
    # LoRA r=16 per layer: 16 x (in + out) for q, k, v, o, gate, up, down
    lora = 16 * 16 * ((2048 + 2048) + 2 * (2048 + 512) + (2048 + 2048) + 3 * (2048 + 8192))
    assert rows["qlora"].trainable == rows["lora"].trainable == lora == 11_272_192
    assert rows["qlora"].total == rows["lora"].total == base + lora
    # 4-bit: the 16 layers' linear weights at ~0.516 bytes, the embeddings (262.7M) and norms at 4 bytes
    quantized = 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192)
    frozen = quantized * (0.5 + 1 / 64 + 4 / (64 * 256)) + (base - quantized) * 4
    assert rows["qlora"].memory_mib["weights"] == round((frozen + lora * 4) / 2**20, 1)
    assert rows["qlora"].memory_mib["weights"] < rows["lora"].memory_mib["weights"] / 3
    assert rows["qlora"].memory_mib["activations"] < rows["lora"].memory_mib["activations"]  # checkpointing
