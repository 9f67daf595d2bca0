"""QLoRA = LoRA + `quantize: nf4` on a tiny random Llama: 4-bit layers, exact counts, training, reload, errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict

from peftlab.errors import InputError
from peftlab.methods import METHODS, count_parameters
from peftlab.methods import quantize as quant
from peftlab.models import load_tokenizer, resolve_model
from peftlab.tasks import TASKS
from tests.tasks.test_causal_classification import ONE_TOKEN, TINY_LLAMA

LORA = {"r": 4, "target_modules": ["q_proj", "v_proj"]}


def build(head: str = "lm", **settings):
    source = resolve_model(TINY_LLAMA)
    tokenizer = load_tokenizer(source)
    task = TASKS.get("causal_classification")(verbalizers=ONE_TOKEN, head=head)
    method = METHODS.get("lora")(**{**LORA, **settings})
    torch.manual_seed(0)
    model = task.build_model(source, tokenizer, **method.load_kwargs())
    model = method.apply(model, head_modules=task.head_modules(model), task_type=task.peft_task_type)
    return task, method, model, tokenizer


@pytest.fixture(scope="module")
def qlora():
    return build(quantize="nf4")


def test_base_linear_layers_are_4bit_and_heads_are_not(qlora) -> None:
    import bitsandbytes as bnb

    _, _, model, _ = qlora
    layer = model.base_model.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.base_layer, bnb.nn.Linear4bit)  # the frozen layer LoRA wraps
    assert isinstance(layer.mlp.gate_proj, bnb.nn.Linear4bit)  # not adapted, quantized all the same
    assert type(model.base_model.model.lm_head) is torch.nn.Linear
    assert model.base_model.model.is_loaded_in_4bit and model.base_model.model.is_gradient_checkpointing


@pytest.mark.parametrize("head", ["lm", "linear"])
def test_counts_match_plain_lora_exactly(head: str) -> None:
    _, _, plain, _ = build(head)
    _, _, quantized, _ = build(head, quantize="nf4")
    # 2 layers x (q: A 4x64 + B 64x4, v: A 4x64 + B 32x4) (+ the linear head's copy: score 64x3)
    lora = 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    assert count_parameters(plain) == count_parameters(quantized)
    assert count_parameters(quantized)[0] == lora + (64 * 3 if head == "linear" else 0)


def test_load_kwargs_ask_for_nf4_double_quant_and_keep_heads() -> None:
    config = METHODS.get("lora")(quantize="nf4", keep_modules=["my_head"]).load_kwargs()["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == quant.compute_dtype("auto")
    assert {"lm_head", "score", "classifier", "my_head"} <= set(config.llm_int8_skip_modules)
    assert METHODS.get("lora")().load_kwargs() == {}


def test_a_training_step_moves_only_the_adapters(qlora) -> None:
    task, _, model, tokenizer = qlora
    rows = Dataset.from_list([{"id": "0", "text": "a great film", "label": "positive"}])
    task.prepare(DatasetDict({"train": rows}), "data")
    batch = task.collator(tokenizer)(list(task.featurize(rows, tokenizer, 32)))
    model.train()
    loss = model(**batch).loss
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert torch.isfinite(loss) and grads and all("lora_" in n for n in grads)
    model.zero_grad()


def test_an_evaluation_pass_leaves_the_next_training_gradients_unchanged() -> None:
    """bitsandbytes repacks 4-bit weights for inference on AVX512-BF16 CPUs; gradients then stopped at
    every 4-bit layer (quant.keep_training_layout). The per-epoch validation must not change training."""
    _, _, model, tokenizer = build(quantize="nf4", dropout=0.0)
    batch = tokenizer(["the movie was good", "bad day"], padding=True, return_tensors="pt")

    def gradients() -> dict[str, torch.Tensor]:
        model.train()
        model.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    before = gradients()
    model.eval()
    with torch.no_grad():
        model(**batch)
    after = gradients()
    assert len(before) == len(after) == 2 * 2 * 2  # every lora_A and lora_B of q and v in both layers
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_saved_adapter_reloads_to_identical_outputs(qlora, tmp_path: Path) -> None:
    task, method, model, tokenizer = qlora
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    method.save(model, tmp_path / "adapter")
    source = resolve_model(TINY_LLAMA)

    def rebuild(saved: str | None):
        torch.manual_seed(0)
        return task.build_model(source, tokenizer, **method.load_kwargs())

    loaded = method.load(rebuild, tmp_path / "adapter")
    batch = tokenizer(["the movie was good", "bad day"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_frozen_bytes_for_plan_count_4bit_linears_and_fp32_rest() -> None:
    source = resolve_model(TINY_LLAMA)
    task = TASKS.get("causal_classification")(verbalizers=ONE_TOKEN)
    method = METHODS.get("lora")(**LORA, quantize="nf4")
    with torch.device("meta"):
        model = task.build_model(source, load_tokenizer(source), weights=False)
        model = method.apply(model, head_modules=[], task_type="CAUSAL_LM")
    linear = 2 * (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 128 * 64)  # q k v o gate up down, 2 layers
    vocab = len(load_tokenizer(source))
    rest = 2 * vocab * 64 + 2 * 2 * 64 + 64  # embeddings and LM head (untied), 2 norms per layer, final norm
    assert quant.bytes_per_weight(True) == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256))
    assert method.frozen_weight_bytes(model) == pytest.approx(linear * quant.bytes_per_weight(True) + rest * 4)
    assert METHODS.get("lora")(**LORA).frozen_weight_bytes(model) is None


def test_machine_without_4bit_support_is_an_input_error_before_training(tmp_path: Path, monkeypatch) -> None:
    from peftlab.config import load_experiment
    from peftlab.experiment import run_experiment
    from tests.conftest import tiny_experiment, write_experiment

    monkeypatch.setattr(quant, "probe", lambda kind="nf4": "RuntimeError: no bitsandbytes backend for cpu")
    methods = {"qlora": {"method": "lora", "quantize": "nf4"}}
    exp = tiny_experiment(tmp_path, model=TINY_LLAMA, methods=methods)
    exp["task"] = {
        "name": "causal_classification",
        "verbalizers": {"negative": "bad", "neutral": "fine", "positive": "great"},
    }
    with pytest.raises(InputError, match=r"methods.qlora: quantize: nf4: bitsandbytes cannot run 4-bit layers"):
        run_experiment(load_experiment(write_experiment(tmp_path, exp)), executor="inline", log=lambda m: None)
    assert not (tmp_path / "runs").exists()


def test_probe_reports_a_missing_bitsandbytes(monkeypatch) -> None:
    import sys

    quant.probe.cache_clear()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert re.match(r"(ModuleNotFound|Import)Error", quant.probe("nf4"))
    quant.probe.cache_clear()
    monkeypatch.undo()
    assert quant.probe("nf4") is None  # bitsandbytes runs 4-bit on this machine (CPU backend)
