"""The gates (peftlab.mixture.gate): expert weights from logits, the uniform start, the parameter formula."""

from __future__ import annotations

import pytest
import torch

from peftlab.mixture.gate import GlobalGate, LayerwiseGate, expert_weights, gate_parameter_count, mlp


def logits(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_weights_are_the_softmax_over_experts() -> None:
    x = logits(2, 5, 4)
    w = expert_weights(x, temperature=1.0, top_k=None)
    assert w.shape == x.shape and w.dtype == torch.float32
    assert torch.allclose(w.sum(-1), torch.ones(2, 5)) and bool((w > 0).all())
    assert torch.allclose(w, torch.softmax(x, dim=-1))


def test_weights_of_half_precision_logits_are_float32() -> None:
    w = expert_weights(logits(3, 4).to(torch.bfloat16), temperature=1.0, top_k=None)
    assert w.dtype == torch.float32 and torch.allclose(w.sum(-1), torch.ones(3))


def test_temperature_divides_the_logits() -> None:
    x = logits(6, 3)
    hot = expert_weights(x, temperature=4.0, top_k=None)
    assert torch.allclose(hot, torch.softmax(x / 4, dim=-1))
    cold = expert_weights(x, temperature=0.25, top_k=None)
    plain = expert_weights(x, temperature=1.0, top_k=None)

    def entropy(w: torch.Tensor) -> torch.Tensor:
        return -(w * w.log()).sum(-1)

    assert bool((entropy(hot) > entropy(plain)).all()) and bool((entropy(cold) < entropy(plain)).all())
    assert bool((hot.argmax(-1) == plain.argmax(-1)).all())  # the order of the experts stays


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_keeps_the_k_highest_and_zeroes_the_rest(k: int) -> None:
    x = logits(4, 7, 5)
    w = expert_weights(x, temperature=1.0, top_k=k)
    assert bool(((w > 0).sum(-1) == k).all())
    assert torch.allclose(w.sum(-1), torch.ones(4, 7))
    top = x.topk(k, dim=-1).indices
    kept = torch.zeros_like(x, dtype=torch.bool).scatter(-1, top, True)
    assert bool((w[~kept] == 0).all())
    expected = torch.softmax(x.masked_fill(~kept, float("-inf")), dim=-1)  # renormalised over the kept ones
    assert torch.allclose(w, expected)


def test_top_k_of_at_least_the_experts_keeps_them_all() -> None:
    x = logits(3, 4)
    for k in (4, 9):
        assert torch.equal(expert_weights(x, temperature=1.0, top_k=k), expert_weights(x, temperature=1.0, top_k=None))


def test_experts_not_allowed_get_exactly_zero() -> None:
    x = logits(2, 3, 4)
    allowed = torch.tensor([True, False, True, True])
    w = expert_weights(x, temperature=1.0, top_k=None, allowed=allowed)
    assert bool((w[..., 1] == 0).all()) and torch.allclose(w.sum(-1), torch.ones(2, 3))
    assert torch.allclose(w[..., allowed], torch.softmax(x[..., allowed], dim=-1))


def test_top_k_counts_only_the_allowed_experts() -> None:
    x = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    w = expert_weights(x, temperature=1.0, top_k=2, allowed=torch.tensor([False, True, True, True]))
    assert w[0, 0] == 0 and w[0, 3] == 0 and bool((w[0, 1:3] > 0).all())
    assert torch.allclose(w[0, 1:3], torch.softmax(torch.tensor([4.0, 1.0]), dim=0))


def test_a_token_with_no_allowed_expert_gets_zeros_not_nan() -> None:
    x = logits(2, 3)
    w = expert_weights(x, temperature=1.0, top_k=2, allowed=torch.zeros(3, dtype=torch.bool))
    assert not bool(w.isnan().any()) and bool((w == 0).all())
    # a mask per token: only the second token has none allowed
    allowed = torch.tensor([[True, True, False], [False, False, False]])
    w = expert_weights(x, temperature=1.0, top_k=None, allowed=allowed)
    assert not bool(w.isnan().any()) and bool((w[1] == 0).all())
    assert torch.allclose(w[0, :2], torch.softmax(x[0, :2], dim=0)) and w[0, 2] == 0


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_every_gate_starts_as_the_uniform_mix(depth: int) -> None:
    torch.manual_seed(0)
    layerwise = LayerwiseGate([8, 16], experts=3, depth=depth, hidden=5)
    for layer, width in enumerate([8, 16]):
        out = layerwise(layer, torch.randn(2, 7, width))
        assert out.shape == (2, 7, 3) and bool((out == 0).all())
        w = expert_weights(out, temperature=0.5, top_k=None)
        assert torch.allclose(w, torch.full_like(w, 1 / 3))
    glob = GlobalGate(hidden_size=12, layers=4, experts=3, depth=depth, hidden=5)
    out = glob(torch.randn(2, 7, 12))
    assert out.shape == (2, 7, 4, 3) and bool((out == 0).all())
    if depth > 1:  # only the last map starts at zero: the layers before it are initialised as usual
        assert bool(glob.net[0].weight.any()) and bool(layerwise.layers[0][0].weight.any())


def test_mlp_has_depth_linear_maps_with_relus_between() -> None:
    net = mlp(6, 2, depth=3, hidden=4)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [(m.in_features, m.out_features) for m in net if isinstance(m, torch.nn.Linear)] == [(6, 4), (4, 4), (4, 2)]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
@pytest.mark.parametrize("hidden", [4, 17])
@pytest.mark.parametrize("widths", [[32], [8, 16, 32], [768] * 4])
@pytest.mark.parametrize("experts", [2, 3])
def test_the_parameter_formula_counts_the_built_gates(depth: int, hidden: int, widths: list[int], experts: int) -> None:
    layerwise = LayerwiseGate(widths, experts, depth, hidden)
    assert gate_parameter_count(widths, experts, depth, hidden, global_from=None) == count(layerwise)
    glob = GlobalGate(48, len(widths), experts, depth, hidden)
    assert gate_parameter_count(widths, experts, depth, hidden, global_from=48) == count(glob)


def test_the_parameter_formula_matches_the_readme_example() -> None:
    """Three q/v experts, default gate: 55,368 trainable on BERT-base, 147,600 on BERT-large (README)."""
    assert gate_parameter_count([768] * 24, 3, 1, 64, global_from=None) == 55_368
    assert gate_parameter_count([1024] * 48, 3, 1, 64, global_from=None) == 147_600  # BERT-large
