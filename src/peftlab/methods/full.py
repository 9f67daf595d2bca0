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
    lr_note = "the usual rate for fine-tuning all weights of a BERT-size model (2e-5 to 5e-5)"

    def analysis_focus(self, model_type: str) -> list[str] | None:
        """Full fine-tuning changes every matrix; it is looked at in detail on the ones LoRA adapts by
        default on the architecture, so the two are compared on the same matrices (the rest summarised)."""
        from peftlab.methods.lora import default_target_table

        return list(default_target_table().get(model_type, [])) or None

    def apply(self, model: nn.Module, *, head_modules: list[str], task_type: str) -> nn.Module:
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)

    def load(self, build: BuildModel, directory: Path) -> nn.Module:
        return build(str(directory))
