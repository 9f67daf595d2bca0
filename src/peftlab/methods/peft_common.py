"""Shared plumbing for methods implemented by HF PEFT: wrap, save the adapter, reload it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # PEFT and torch load when a model is adapted, not when a config is validated
    import torch
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


def adapted_layers(model: nn.Module, layer_type: type) -> Iterator[tuple[str, nn.Module]]:
    """(name in the task model, layer) for each PEFT layer of `layer_type` (LoraLayer, IA3Layer)."""
    for name, module in model.named_modules():
        if isinstance(module, layer_type):
            yield name.removeprefix("base_model.model."), module


def base_weight(layer: nn.Module) -> torch.Tensor:
    """A PEFT layer's frozen base weight as float32 [out, in]: dequantized when 4-bit (QLoRA's ΔW is
    measured against the weights the adapter actually sits on), transposed for fan_in_fan_out."""
    from peft.utils.integrations import dequantize_module_weight

    base = layer.get_base_layer()
    weight = dequantize_module_weight(base).detach().float()
    return weight.T if getattr(layer, "fan_in_fan_out", False) else weight


def default_targets(table: dict[str, Any], model_type: str, what: str, method: str) -> Any:
    """Look up an architecture's default modules; a clear error if it has none."""
    from peftlab.errors import InputError

    if model_type not in table:
        raise InputError(
            f"{method}: no default {what} for model type '{model_type}'; set methods.<run>.{what} "
            f"(known defaults: {', '.join(sorted(table))})"
        )
    return table[model_type]
