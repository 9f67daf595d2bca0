"""Methods: what is trainable, exact parameter counts, defaults per architecture, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peftlab.errors import InputError
from peftlab.methods import METHODS, count_parameters
from peftlab.models import load_tokenizer, resolve_model
from peftlab.tasks import TASKS
from tests.conftest import TINY_BERT

TINY_DISTILBERT = {
    "arch": "distilbert",
    "random_init": True,
    "config": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64},
}


def build(model_spec: dict, method: str, labels: int = 3, **settings):
    source = resolve_model(model_spec)
    task = TASKS.get("classification")(labels=[f"l{i}" for i in range(labels)])
    torch.manual_seed(0)
    model = task.build_model(source, load_tokenizer(source))
    applied = METHODS.get(method)(**settings).apply(
        model, head_modules=task.head_modules(model), task_type=task.peft_task_type
    )
    return task, applied


def test_lora_counts_rank_times_dims_plus_head() -> None:
    _, model = build(TINY_BERT, "lora", r=4)
    # 2 layers x (query, value) x (A: 4x32 + B: 32x4) + classifier 32x3 + 3
    assert count_parameters(model)[0] == 2 * 2 * (4 * 32 + 32 * 4) + 32 * 3 + 3


def test_ia3_counts_scaling_vectors_plus_head() -> None:
    _, model = build(TINY_BERT, "ia3")
    # PEFT's BERT default: key, value (output scaled: 32 each), output.dense (feed-forward: input scaled),
    # which matches attention.output.dense (in 32) and output.dense (in 64), per layer
    assert count_parameters(model)[0] == 2 * (32 + 32 + 32 + 64) + 32 * 3 + 3


def test_full_trains_everything_and_counts_like_numel() -> None:
    _, model = build(TINY_BERT, "full")
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == (total, total)


def test_head_modules_are_trainable_and_backbone_frozen() -> None:
    _task, model = build(TINY_DISTILBERT, "lora", r=2)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("pre_classifier" in n for n in trainable) and any(
        n.endswith("classifier.modules_to_save.default.weight") for n in trainable
    )
    assert all("lora_" in n or "classifier" in n for n in trainable)


def test_distilbert_defaults_are_peftlabs_own() -> None:
    assert METHODS.get("lora")().resolve("distilbert")["target_modules"] == ["q_lin", "v_lin"]
    ia3 = METHODS.get("ia3")().resolve("distilbert")
    assert ia3["target_modules"] == ["k_lin", "v_lin", "lin2"] and ia3["feedforward_modules"] == ["lin2"]


def test_unknown_architecture_without_targets_is_an_input_error() -> None:
    with pytest.raises(InputError, match="no default target_modules for model type 'mystery'"):
        METHODS.get("lora")().resolve("mystery")
    assert METHODS.get("lora")(target_modules=["proj"]).resolve("mystery")["target_modules"] == ["proj"]


@pytest.mark.parametrize("method", ["full", "lora", "ia3"])
def test_save_and_load_restores_identical_outputs(tmp_path: Path, method: str) -> None:
    task, model = build(TINY_BERT, method)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # stand-in for training: move every trained weight
    model.eval()
    impl = METHODS.get(method)()
    impl.save(model, tmp_path / "adapter")
    source = resolve_model(TINY_BERT)
    tok = load_tokenizer(source)

    def rebuild(saved: str | None):
        torch.manual_seed(0)
        return task.build_model(source if saved is None else resolve_model(saved), tok)

    loaded = impl.load(rebuild, tmp_path / "adapter")
    loaded.eval()
    batch = tok(["the movie was good", "bad day"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
