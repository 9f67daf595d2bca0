"""Each method's ΔW (for `analyze`) is exactly what merging it into W0 adds, in the [out, in] layout."""

from __future__ import annotations

import copy

import pytest
import torch

from peftlab.methods import METHODS
from peftlab.methods.base import dense_changes
from tests.methods.test_methods import TINY_DISTILBERT, build
from tests.methods.test_qlora import build as build_causal


def _perturb(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Move the method's own parameters off their identity start, as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in names):
                param.add_(0.3 * torch.randn_like(param))


def _merged_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    merged = copy.deepcopy(model).merge_and_unload()
    return {
        name: module.weight.detach().float() for name, module in merged.named_modules() if hasattr(module, "weight")
    }


@pytest.mark.parametrize(("method", "own"), [("lora", ("lora_B", "lora_A")), ("ia3", ("ia3_l",))])
@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_peft_delta_equals_merged_minus_base(method: str, own: tuple[str, ...], arch: str) -> None:
    from tests.conftest import TINY_BERT

    _, model = build(TINY_BERT if arch == "bert" else TINY_DISTILBERT, method, **({"r": 4} if method == "lora" else {}))
    _perturb(model, own)
    changes = list(METHODS.get(method)().weight_changes(model, base=lambda: pytest.fail("needs no base model")))
    merged = _merged_weights(model)
    assert len(changes) >= 4
    for change in changes:
        assert change.delta.shape == change.base.shape
        assert change.delta.abs().max() > 0
        torch.testing.assert_close(change.base + change.delta, merged[change.name], rtol=1e-5, atol=1e-6)
        if method == "lora":
            assert change.rank_limit == 4 and change.factor is not None and change.factor.shape[0] == 4
            assert torch.linalg.matrix_rank(change.delta).item() <= 4


def test_ia3_with_every_scale_one_changes_nothing() -> None:
    from tests.conftest import TINY_BERT

    _, model = build(TINY_BERT, "ia3")  # (IA)3 starts at l = 1: the identity
    changes = list(METHODS.get("ia3")().weight_changes(model, base=lambda: None))
    assert changes and all(c.delta.abs().max().item() == 0.0 for c in changes)


def test_full_delta_is_the_trained_minus_the_base_backbone_and_skips_the_head() -> None:
    from tests.conftest import TINY_BERT

    _, base = build(TINY_BERT, "full")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.bert.encoder.layer[1].attention.self.query.weight.add_(1.0)
        tuned.classifier.weight.add_(1.0)
    changes = {c.name: c for c in METHODS.get("full")().weight_changes(tuned, base=lambda: base)}
    assert "classifier" not in changes and not any(name.startswith("classifier") for name in changes)
    query = changes["bert.encoder.layer.1.attention.self.query"]
    torch.testing.assert_close(query.delta, torch.ones_like(query.delta))
    others = [c for name, c in changes.items() if name != "bert.encoder.layer.1.attention.self.query"]
    assert others and all(c.delta.abs().max().item() == 0.0 for c in others)
    assert len(list(dense_changes(base, base))) == len(changes)


def test_qlora_delta_sits_on_the_dequantized_base() -> None:
    _, method, model, _ = build_causal(quantize="nf4")
    _perturb(model, ("lora_B",))
    changes = list(method.weight_changes(model, base=lambda: None))
    assert changes
    for change in changes:
        assert change.base.dtype == torch.float32 and change.base.shape == change.delta.shape
        assert torch.linalg.matrix_rank(change.delta).item() <= 4
