"""LoRA (Hu et al., 2021): trainable low-rank updates B·A beside frozen weight matrices."""

from __future__ import annotations

from typing import Any, Literal

from peft import LoraConfig, PeftConfig
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from pydantic import Field, PositiveInt

from peftlab.methods.base import MethodSettings
from peftlab.methods.peft_common import PeftMethod, default_targets
from peftlab.registry import METHODS

# PEFT's own per-architecture defaults, plus the architectures PEFT has none for.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    "distilbert": ["q_lin", "v_lin"],
}


class LoraSettings(MethodSettings):
    r: PositiveInt = Field(8, description="rank of the update")
    alpha: PositiveInt = Field(16, description="scaling: the update is multiplied by alpha / r")
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="module names (suffixes) to adapt; default: the architecture's attention q/v"
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    layers: list[int] | None = Field(None, description="only these layer indices (default: all)")


@METHODS.register("lora")
class Lora(PeftMethod):
    """LoRA through PEFT; the task head is trained and saved with the adapter."""

    Settings = LoraSettings
    default_lr = 5e-4
    lr_note = "about 10x full fine-tuning: the low-rank update starts at zero and has few weights"

    def resolve(self, model_type: str) -> dict[str, Any]:
        resolved = self.settings.model_dump()
        if resolved["target_modules"] is None:
            resolved["target_modules"] = list(default_targets(DEFAULT_TARGETS, model_type, "target_modules", "lora"))
        return resolved

    def peft_config(self, *, head_modules: list[str], task_type: str, model_type: str) -> PeftConfig:
        s = self.resolve(model_type)
        return LoraConfig(
            task_type=task_type,
            r=s["r"],
            lora_alpha=s["alpha"],
            lora_dropout=s["dropout"],
            target_modules=s["target_modules"],
            bias=s["bias"],
            layers_to_transform=s["layers"],
            modules_to_save=head_modules or None,
        )
