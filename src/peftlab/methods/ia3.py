"""(IA)3 (Liu et al., 2022): learned vectors that rescale chosen activations; nothing else trains."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from pydantic import Field

from peftlab.methods.base import MethodSettings, WeightChange
from peftlab.methods.peft_common import PeftMethod, adapted_layers, base_weight, default_targets
from peftlab.registry import METHODS

if TYPE_CHECKING:  # PEFT loads when a model is adapted, not when a config is validated
    from peft import PeftConfig
    from torch import nn


@functools.cache
def default_tables() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """PEFT's own per-architecture defaults (targets, feed-forward), plus the architectures PEFT has none for."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    )

    targets = {**TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING, "distilbert": ["k_lin", "v_lin", "lin2"]}
    return targets, {**TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING, "distilbert": ["lin2"]}


class IA3Settings(MethodSettings):
    target_modules: list[str] | None = Field(
        None, description="modules whose activations are rescaled; default: the architecture's k, v, ffn-out"
    )
    feedforward_modules: list[str] | None = Field(
        None,
        description="the subset of target_modules whose *input* is rescaled (the others: their output); "
        "default: the architecture's feed-forward output layer",
    )


@METHODS.register("ia3")
class IA3(PeftMethod):
    """(IA)3 through PEFT; the task head is trained and saved with the adapter."""

    Settings = IA3Settings
    default_lr = 2e-2
    lr_note = (
        "10x LoRA: the scaling vectors start at 1 and are few; on three offline tasks (MiniLM-L6, README) "
        "2e-2 to 4e-2 was best, above the published 3e-3 to 1e-2, which leave it under-trained in a few epochs"
    )

    def resolve(self, model_type: str) -> dict[str, Any]:
        resolved = self.settings.model_dump()
        if resolved["target_modules"] is None:
            targets, feedforward = default_tables()
            resolved["target_modules"] = list(default_targets(targets, model_type, "target_modules", "ia3"))
            if resolved["feedforward_modules"] is None:
                resolved["feedforward_modules"] = list(
                    default_targets(feedforward, model_type, "feedforward_modules", "ia3")
                )
        if resolved["feedforward_modules"] is None:
            resolved["feedforward_modules"] = []
        return resolved

    def weight_changes(self, model: nn.Module, base: Callable[[], nn.Module]) -> Iterator[WeightChange]:
        """ΔW = W·(diag(l) − I): (IA)3 rescales a layer's output rows (k, v) or, in the feed-forward layer,
        its input columns; merged, that is W times l along that axis (PEFT's IA3Layer.merge)."""
        from peft.tuners.ia3 import IA3Layer

        for name, layer in adapted_layers(model, IA3Layer):
            if "default" not in layer.ia3_l or not hasattr(layer.get_base_layer(), "weight"):
                continue
            weight = base_weight(layer)
            scale = layer.ia3_l["default"].detach().float().reshape(-1)
            along = scale.reshape(1, -1) if layer.is_feedforward else scale.reshape(-1, 1)
            yield WeightChange(name, weight, weight * (along - 1), rank_limit=None)

    def peft_config(self, *, head_modules: list[str], task_type: str, model_type: str) -> PeftConfig:
        from peft import IA3Config

        s = self.resolve(model_type)
        return IA3Config(
            task_type=task_type,
            target_modules=s["target_modules"],
            feedforward_modules=s["feedforward_modules"],
            modules_to_save=head_modules or None,
        )
