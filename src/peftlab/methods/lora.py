"""LoRA (Hu et al., 2021): trainable low-rank updates B·A beside frozen weight matrices.

With `quantize: nf4` this is QLoRA (Dettmers et al., 2023): the frozen base weights are loaded in
4-bit (methods/quantize.py), PEFT's `prepare_model_for_kbit_training` readies the model (norms and
embeddings in fp32, input gradients) and gradient checkpointing is on; the adapters train as usual.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, PositiveInt

from peftlab.errors import InputError
from peftlab.methods import quantize as quant
from peftlab.methods.base import BuildModel, MethodSettings, WeightChange
from peftlab.methods.peft_common import PeftMethod, adapted_layers, base_weight, default_targets
from peftlab.registry import METHODS

if TYPE_CHECKING:  # PEFT and torch load when a model is adapted, not when a config is validated
    from peft import PeftConfig
    from torch import nn


@functools.cache
def default_target_table() -> dict[str, list[str]]:
    """PEFT's own per-architecture defaults, plus the architectures PEFT has none for."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return {**TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "distilbert": ["q_lin", "v_lin"]}


class LoraSettings(MethodSettings):
    r: PositiveInt = Field(8, description="rank of the update")
    alpha: PositiveInt = Field(16, description="scaling: the update is multiplied by alpha / r")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="dropout on the adapter's input; 0 (PEFT's default): on the quickstart 0.1 gave the same "
        "accuracy (test .740 vs .741) and cost 4% more time per step",
    )
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="module names (suffixes) to adapt; default: the architecture's attention q/v"
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    layers: list[int] | None = Field(None, description="only these layer indices (default: all)")
    quantize: quant.Quantize | None = Field(
        None, description="load the frozen base weights in 4-bit (nf4 = QLoRA, or fp4) with bitsandbytes"
    )
    double_quant: bool = Field(True, description="quantize the 4-bit block scales too (QLoRA's double quantization)")
    compute_dtype: quant.ComputeDtype = Field(
        "auto", description="dtype the 4-bit layers compute in; auto = bf16 where supported, else fp16/fp32"
    )
    keep_modules: list[str] = Field(
        default_factory=list, description="more modules to keep out of quantization (task heads always are)"
    )


@METHODS.register("lora")
class Lora(PeftMethod):
    """LoRA through PEFT; the task head is trained and saved with the adapter."""

    Settings = LoraSettings
    default_lr = 2e-3
    lr_note = (
        "40x full fine-tuning: the low-rank update starts at zero and has few weights; on three offline tasks "
        "(MiniLM-L6, README) 2e-3 was best or within a point of the best, where 5e-4 stayed near the majority class"
    )

    def resolve(self, model_type: str) -> dict[str, Any]:
        resolved = self.settings.model_dump()
        if resolved["quantize"] is None:  # the 4-bit options mean nothing then: keep plain LoRA's record plain
            for key in ("quantize", "double_quant", "compute_dtype", "keep_modules"):
                resolved.pop(key)
        if resolved["target_modules"] is None:
            resolved["target_modules"] = list(
                default_targets(default_target_table(), model_type, "target_modules", "lora")
            )
        return resolved

    @property
    def gradient_checkpointing(self) -> bool:
        """QLoRA always checkpoints activations (it is part of the recipe; `plan` counts on it)."""
        return self.settings.quantize is not None

    def load_kwargs(self) -> dict[str, Any]:
        s = self.settings
        if s.quantize is None:
            return {}
        config = quant.bnb_config(s.quantize, double_quant=s.double_quant, dtype=s.compute_dtype, keep=s.keep_modules)
        return {"quantization_config": config}

    def check_runtime(self) -> None:
        if self.settings.quantize is not None and (problem := quant.probe(self.settings.quantize)):
            raise InputError(
                f"quantize: {self.settings.quantize}: bitsandbytes cannot run 4-bit layers on this machine "
                f"({problem}); remove `quantize` to train plain LoRA"
            )

    def frozen_weight_bytes(self, model: nn.Module) -> float | None:
        """Bytes of the frozen weights under 4-bit (for `plan`); None: the default estimate applies."""
        s = self.settings
        if s.quantize is None:
            return None
        return quant.quantized_bytes(model, double_quant=s.double_quant, keep=s.keep_modules)

    def apply(self, model: nn.Module, *, head_modules: list[str], task_type: str) -> nn.Module:
        if getattr(model, "is_loaded_in_4bit", False):
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                quant.keep_training_layout(model),
                use_gradient_checkpointing=True,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        return super().apply(model, head_modules=head_modules, task_type=task_type)

    def load(self, build: BuildModel, directory: Path) -> nn.Module:
        return quant.keep_training_layout(super().load(build, directory))

    def weight_changes(self, model: nn.Module, base: Callable[[], nn.Module]) -> Iterator[WeightChange]:
        """ΔW = B·A·(alpha/r) per adapted matrix (Hu et al. 2021), with A kept for subspace comparisons."""
        from peft.tuners.lora import LoraLayer

        for name, layer in adapted_layers(model, LoraLayer):
            if "default" not in layer.lora_A:  # embeddings adapted by lora_embedding_*: not a linear map
                continue
            a = layer.lora_A["default"].weight.detach().float()
            b = layer.lora_B["default"].weight.detach().float()
            delta = (b @ a) * float(layer.scaling["default"])
            yield WeightChange(name, base_weight(layer), delta, rank_limit=a.shape[0], factor=a)

    def reduce_intruders(self, model: nn.Module, strength: float, top_k: int, epsilon: float) -> list[str]:
        """PEFT's `reduce_intruder_dimension`, then the reduced adapter made the `default` one (what `save`
        and `load` use); the trained head of `default` stays (PEFT's new adapter would copy the untrained one)."""
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.intruders import reduce_intruder_dimension

        found: list[str] = []
        new = "intruder_reduced"
        reduce_intruder_dimension(
            model, top_k=top_k, threshold_epsilon=epsilon, mitigation_lambda=strength, logging_sink=found.append
        )
        for module in model.modules():
            if isinstance(module, LoraLayer) and new in module.lora_A:
                module.lora_A["default"].weight.data = module.lora_A[new].weight.data.clone()
                module.lora_B["default"].weight.data = module.lora_B[new].weight.data.clone()
        model.set_adapter("default")
        model.delete_adapter(new)
        return found

    def peft_config(self, *, head_modules: list[str], task_type: str, model_type: str) -> PeftConfig:
        from peft import LoraConfig

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
