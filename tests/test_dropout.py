"""peftlab.dropout: FastDropout does nn.Dropout's operation (rate, scaling, gradient, eval) and replaces it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftlab.dropout import FastDropout, keep_mask, use_fast_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_p(p: float) -> None:
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([400, 1000]), p, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (400, 1000)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.005  # 400k draws: sd about 0.0008


def test_keep_mask_draws_every_position_alike() -> None:
    """Each of the four 16-bit numbers cut from one 64-bit draw is uniform (none has a fixed bit)."""
    torch.manual_seed(1)
    mask = keep_mask(torch.Size([400_000]), 0.5, torch.device("cpu")).view(-1, 4).float().mean(0)
    assert torch.allclose(mask, torch.full((4,), 0.5), atol=0.01)


def test_odd_sizes_and_dtypes() -> None:
    torch.manual_seed(0)
    layer = FastDropout(0.25).train()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.ones(3, 5, 7, dtype=dtype)  # 105 elements: not a multiple of four
        y = layer(x)
        assert y.dtype == dtype and y.shape == x.shape
        values = torch.unique(y.float())
        assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(1 / 0.75, rel=1e-2)


def test_scaling_keeps_the_mean_and_the_gradient_follows_the_mask() -> None:
    torch.manual_seed(0)
    layer = FastDropout(0.2).train()
    x = torch.ones(200_000, requires_grad=True)
    y = layer(x)
    assert abs(y.mean().item() - 1.0) < 0.01
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * keep / 0.8)/dx = keep / 0.8, which is y at x = 1


def test_eval_and_zero_rate_are_identity_and_seeds_repeat() -> None:
    x = torch.randn(64, 32)
    assert torch.equal(FastDropout(0.3).eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    torch.manual_seed(5)
    first = FastDropout(0.3).train()(x)
    torch.manual_seed(5)
    assert torch.equal(FastDropout(0.3).train()(x), first)
    assert not torch.equal(FastDropout(0.3).train()(x), first)


def test_use_fast_dropout_replaces_plain_dropouts_with_the_same_rate() -> None:
    class Custom(nn.Dropout):
        pass

    model = nn.Sequential(
        nn.Linear(4, 4), nn.Dropout(0.1), nn.ModuleDict({"default": nn.Dropout(0.3)}), Custom(0.2), nn.Identity()
    )
    assert use_fast_dropout(model) == 2
    assert type(model[1]) is FastDropout and model[1].p == 0.1
    assert type(model[2]["default"]) is FastDropout and model[2]["default"].p == 0.3
    assert type(model[3]) is Custom  # subclasses may do more than drop: left alone
    assert use_fast_dropout(model) == 0
