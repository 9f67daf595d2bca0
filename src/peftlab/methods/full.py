"""Full fine-tuning: every weight is trained; the whole model is saved."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peftlab.methods.base import BuildModel, Method
from peftlab.registry import METHODS

if TYPE_CHECKING:
    from torch import nn


@METHODS.register("full")
class Full(Method):
    """Train all weights. The reference point every PEFT method is compared against."""

    default_lr = 5e-5
    dense_update = True
    lr_note = "the usual rate for fine-tuning all weights of a BERT-size model (2e-5 to 5e-5)"

    def apply(self, model: nn.Module, *, head_modules: list[str], task_type: str) -> nn.Module:
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)

    def load(self, build: BuildModel, directory: Path) -> nn.Module:
        return build(str(directory))
