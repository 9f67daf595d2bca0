"""Dropout whose random mask is cheap on the CPU: the same operation as nn.Dropout, drawn differently.

Why by hand: on the CPU, torch draws a dropout mask one Mersenne-Twister number per element
(`bernoulli_`), about 4 ms for one [32, 36, 384] activation on 2 cores. A BERT-size encoder has about
20 dropout layers per training step and LoRA adds one per adapted matrix, so masks alone cost a quarter
of a full fine-tuning step and more of a LoRA step (profiled: `bernoulli_` was 18% of a full step's CPU
time and 39% of a LoRA step's). Here one 64-bit draw makes four 16-bit numbers, each compared with a
threshold: P(keep) = 1 - p to within 2^-16, kept values scaled by 1 / (1 - p) as nn.Dropout does, about
4x cheaper per mask. No library offers this; CUDA's own dropout (Philox) is fast and is left alone.

The masks come from torch's default generator, so a seeded run repeats exactly. Dropout inside
fused attention kernels (`scaled_dot_product_attention(dropout_p=...)`) is not an nn.Dropout module
and keeps torch's own mask. An attention implementation that did sdpa's math with `keep_mask` was
tried (2026-12-02) and dropped: interleaved on one model it saved only 2-7% of a MiniLM step, and the
quickstart's LoRA test accuracy over 8 seeds was 1 point lower with it (.718 vs .728, t about 2.3;
torch's masks in the same function reproduced sdpa's numbers), a gap no statistic of the masks
explained.
"""

from __future__ import annotations

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
