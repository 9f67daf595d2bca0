"""peftlab.dropout: FastDropout does nn.Dropout's operation (rate, scaling, gradient, eval) and replaces it;
the attention implementation drops attention probabilities with the same masks and is sdpa otherwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftlab.dropout import ATTENTION, FastDropout, attention, fast_attention_dropout, keep_mask, use_fast_dropout


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


def _qkv(mask_last: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """query, key, value [batch 2, heads 2, tokens 6, dim 4] and an sdpa boolean padding mask."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 4, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[0, :, :, -mask_last:] = False  # the first example's last keys are padding
    return q, k, v, mask


def test_attention_is_the_softmax_math_with_keep_mask_dropped_probabilities() -> None:
    q, k, v, mask = _qkv()
    module = nn.Module().train()
    torch.manual_seed(7)
    out, weights = attention(module, q, k, v, mask, dropout=0.25, scaling=0.5)
    torch.manual_seed(7)
    keep = keep_mask(torch.Size([2, 2, 6, 6]), 0.25, q.device)
    probs = torch.softmax((q @ k.transpose(2, 3) * 0.5).masked_fill(~mask, float("-inf")), dim=-1)
    expected = (probs * keep / 0.75) @ v
    assert weights is None and out.shape == (2, 6, 2, 4)  # [batch, tokens, heads, dim], as sdpa's
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-6)
    assert not keep.all() and keep.any()  # some probabilities were dropped, not all
    out.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_attention_without_dropout_or_with_a_causal_kernel_is_sdpa_exactly() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, mask = _qkv()
    module = nn.Module().eval()
    for args, kwargs in [((mask,), {"dropout": 0.0}), ((None,), {"dropout": 0.0, "is_causal": True})]:
        assert torch.equal(
            attention(module, q, k, v, *args, **kwargs)[0], sdpa_attention_forward(module, q, k, v, *args, **kwargs)[0]
        )
    torch.manual_seed(3)  # causal with no mask: the kernel's own (torch) dropout, as sdpa
    mine = attention(module, q, k, v, None, dropout=0.5, is_causal=True)[0]
    torch.manual_seed(3)
    assert torch.equal(mine, sdpa_attention_forward(module, q, k, v, None, dropout=0.5, is_causal=True)[0])


def test_fast_attention_dropout_switches_sdpa_models_while_inside_only() -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(
        "bert", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(3, 100, (3, 10))
    padding = torch.ones_like(ids)
    padding[0, 5:] = 0
    before = model(input_ids=ids, attention_mask=padding).logits
    with fast_attention_dropout(model) as switched:
        assert switched and model.config._attn_implementation == ATTENTION
        assert torch.allclose(model(input_ids=ids, attention_mask=padding).logits, before, atol=1e-6)  # eval: sdpa
        model.train()
        torch.manual_seed(1)
        first = model(input_ids=ids, attention_mask=padding).logits
        torch.manual_seed(1)
        assert torch.equal(model(input_ids=ids, attention_mask=padding).logits, first)  # seeded: repeats
    assert model.config._attn_implementation == "sdpa"  # set back: nothing saved names ATTENTION
    eager = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    with fast_attention_dropout(eager) as switched:
        assert not switched and eager.config._attn_implementation == "eager"


def test_attention_under_bf16_autocast_computes_in_fp32_as_sdpa() -> None:
    """bf16 inputs, fp32 math, a bf16 result: within bf16 rounding of the fp32 reference (bf16 math is
    about twice as far off, which this bound catches)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 4, 32, 16).mul(3).bfloat16() for _ in range(3))
    module = nn.Module().train()
    p = 1e-9  # keep_mask keeps everything: the attention math alone, on the dropout path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention(module, q, k, v, None, dropout=p)
    reference = torch.softmax(q.float() @ k.float().transpose(2, 3) * 0.25, dim=-1) @ v.float()
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference.transpose(1, 2)).abs().max() <= 0.05
