"""Shared plumbing for methods implemented by HF PEFT: wrap, save the adapter, reload it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # PEFT and torch load when a model is adapted, not when a config is validated
    from peft import PeftConfig
    from torch import nn

from peftlab.methods.base import BuildModel, Method


class PeftMethod(Method):
    """A method that is one PEFT config: subclasses build the config from their settings."""

    def peft_config(self, *, head_modules: list[str], task_type: str, model_type: str) -> PeftConfig:
        raise NotImplementedError

    def apply(self, model: nn.Module, *, head_modules: list[str], task_type: str) -> nn.Module:
        model_type = getattr(getattr(model, "config", None), "model_type", "")
        config = self.peft_config(head_modules=head_modules, task_type=task_type, model_type=model_type)
        from peft import get_peft_model

        return get_peft_model(model, config)

    def save(self, model: nn.Module, directory: Path) -> None:
        # Saves the adapter weights and the trainable task head (modules_to_save) as safetensors.
        model.save_pretrained(directory)

    def load(self, build: BuildModel, directory: Path) -> nn.Module:
        from peft import PeftModel

        model = PeftModel.from_pretrained(build(None), directory)
        model.eval()
        return model


def default_targets(table: dict[str, Any], model_type: str, what: str, method: str) -> Any:
    """Look up an architecture's default modules; a clear error if it has none."""
    from peftlab.errors import InputError

    if model_type not in table:
        raise InputError(
            f"{method}: no default {what} for model type '{model_type}'; set methods.<run>.{what} "
            f"(known defaults: {', '.join(sorted(table))})"
        )
    return table[model_type]
