"""Dropout whose random mask is cheap on the CPU: the same operation as nn.Dropout, drawn differently.

Why by hand: on the CPU, torch draws a dropout mask one Mersenne-Twister number per element
(`bernoulli_`), about 4 ms for one [32, 36, 384] activation on 2 cores. A BERT-size encoder has about
20 dropout layers per training step and LoRA adds one per adapted matrix, so masks alone cost a quarter
of a full fine-tuning step and more of a LoRA step (profiled: `bernoulli_` was 18% of a full step's CPU
time and 39% of a LoRA step's). Here one 64-bit draw makes four 16-bit numbers, each compared with a
threshold: P(keep) = 1 - p to within 2^-16, kept values scaled by 1 / (1 - p) as nn.Dropout does, about
4x cheaper per mask. No library offers this; CUDA's own dropout (Philox) is fast and is left alone.

Attention-probability dropout is not an nn.Dropout module: transformers passes its p to
`scaled_dot_product_attention(dropout_p=...)`, which on the CPU falls back to its unfused math path
with torch's own masks. `fast_attention_dropout` registers, for the duration of training, an
attention implementation (transformers' AttentionInterface) that computes the same math with
`keep_mask`: measured on MiniLM (batch 32 x 64, bf16 autocast) a full fine-tuning step took 0.86-0.92x
the time of the sdpa one, LoRA 0.81-0.99x (with torch's masks in the same function: 1.0x, so the
gain is the masks). It delegates to sdpa wherever it would differ (evaluation, p = 0, causal masks
left to the kernel, grouped KV heads, position biases, CUDA).

The masks come from torch's default generator, so a seeded run repeats exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

_LEVELS = 1 << 16  # 16-bit draws: p is applied to within 1 / 65,536


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A boolean mask of `shape`, each element True with probability 1 - p (to within 2^-16)."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    draws = words.view(torch.int16)[:n].view(shape)  # four uniform 16-bit numbers per 64-bit draw
    return draws >= round(p * _LEVELS) - _LEVELS // 2


class FastDropout(nn.Dropout):
    """nn.Dropout with `keep_mask` (an nn.Dropout still: isinstance checks and `p` work as before)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return torch.zeros_like(x)
        keep = keep_mask(x.shape, self.p, x.device)
        if self.inplace:
            return x.mul_(keep).mul_(1 / (1 - self.p))
        return x * keep * (1 / (1 - self.p))


def use_fast_dropout(model: nn.Module) -> int:
    """Replace every plain nn.Dropout in `model` (the model's own and adapters', e.g. LoRA's) by a
    FastDropout with the same p; returns how many were replaced. Subclasses are left as they are.
    Where CUDA is available (the Trainer trains there) nothing is replaced: its own masks are cheap."""
    if torch.cuda.is_available():
        return 0
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, name, FastDropout(child.p, inplace=child.inplace))
                replaced += 1
    return replaced


ATTENTION = "peftlab_fast_dropout"  # the attention implementation's name in transformers' registries


def attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, with the attention probabilities dropped by `keep_mask`.

    Same signature and result layout ([batch, query, heads, head_dim]) as sdpa_attention_forward;
    every case this does not handle the same way goes to it unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if (
        dropout == 0
        or query.device.type != "cpu"
        or (attention_mask is None and causal)
        or kwargs.get("position_bias") is not None
        or kwargs.get("cache") is not None
        or getattr(module, "num_key_value_groups", 1) > 1
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    # In fp32 whatever the autocast, as sdpa's CPU math accumulates, so that this computes what sdpa
    # computes (bf16 scores and probabilities doubled the error against fp32). Attention is a few % of
    # a step's work at these lengths; the fp32 matmuls cost about nothing measurable.
    with torch.autocast(query.device.type, enabled=False):
        scale = query.size(-1) ** -0.5 if scaling is None else scaling
        scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scale
        if attention_mask is not None and attention_mask.dtype == torch.bool:  # sdpa masks: True = attend
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        elif attention_mask is not None:  # an additive float mask
            scores = scores + attention_mask.float()
        probs = torch.softmax(scores, dim=-1)
        probs = probs * keep_mask(probs.shape, dropout, probs.device) * (1 / (1 - dropout))
        out = torch.matmul(probs, value.float()).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    """Make ATTENTION known to transformers (attention and its mask, built as sdpa's); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


@contextmanager
def fast_attention_dropout(model: nn.Module) -> Iterator[bool]:
    """While inside, the model's sdpa attention drops probabilities with `keep_mask` (`attention`);
    yields whether it was switched. Models on other attention implementations (eager, flash, a
    model without transformers' attention interface) and CUDA are left as they are. The model's
    implementation is set back on leaving, so nothing saved or exported names ATTENTION."""
    from transformers import PreTrainedModel

    top = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    config = getattr(top, "config", None)
    if top is None or torch.cuda.is_available() or getattr(config, "_attn_implementation", None) != "sdpa":
        yield False
        return
    _register()
    try:
        top.set_attn_implementation(ATTENTION)
    except (ValueError, ImportError, NotImplementedError):  # a model that refuses custom attention
        yield False
        return
    try:
        yield True
    finally:
        top.set_attn_implementation("sdpa")
