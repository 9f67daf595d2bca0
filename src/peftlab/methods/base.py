"""What every fine-tuning method provides, and parameter accounting shared by all of them.

A method turns a freshly built task model into the model that is trained (`apply`), saves what
training changed (`save`) and rebuilds the trained model from disk (`load`). It may also ask for
extra `from_pretrained` arguments (`load_kwargs`, e.g. 4-bit quantization for QLoRA) and declares
its default learning rate, because methods that train 0.1% of the weights need far higher rates
than full fine-tuning (see `default_lr` and the README's table).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from torch import nn

# The rebuild callback a method's `load` receives: source=None builds the base task model from the
# experiment's model, source=PATH builds it from a saved full model.
BuildModel = Callable[[str | None], "nn.Module"]


class MethodSettings(BaseModel):
    """Base of each method's settings schema: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Method:
    """Base class of the registered methods (see methods/full.py, lora.py, ia3.py)."""

    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    default_lr: ClassVar[float]
    lr_note: ClassVar[str] = ""

    def __init__(self, **settings: Any) -> None:
        self.settings = self.Settings.model_validate(settings)

    def resolve(self, model_type: str) -> dict[str, Any]:
        """The settings with architecture-dependent defaults (e.g. target modules) filled in."""
        return self.settings.model_dump()

    def load_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for the base model's `from_pretrained` (e.g. quantization)."""
        return {}

    def check_runtime(self) -> None:
        """Raise InputError when this machine cannot run the method as set (checked before training)."""

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the method always checkpoints activations (`plan` estimates memory accordingly)."""
        return False

    def frozen_weight_bytes(self, model: nn.Module) -> float | None:
        """Bytes of the frozen weights when the method stores them its own way (e.g. 4-bit), for `plan`;
        None: the default estimate (4 bytes per weight) applies."""
        return None

    def apply(self, model: nn.Module, *, head_modules: list[str], task_type: str) -> nn.Module:
        raise NotImplementedError

    def save(self, model: nn.Module, directory: Path) -> None:
        raise NotImplementedError

    def load(self, build: BuildModel, directory: Path) -> nn.Module:
        raise NotImplementedError


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counted the way PEFT's `get_nb_trainable_parameters` does.

    PEFT models use PEFT's own count. Other models use the same rule by hand because PEFT only offers
    it as a method of PeftModel: bitsandbytes 4-bit weights are packed two to a byte, so a packed
    tensor counts as the number of weights it stands for.
    """
    counter = getattr(model, "get_nb_trainable_parameters", None)
    if callable(counter):
        trainable, total = counter()
        return int(trainable), int(total)
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2 * getattr(getattr(param, "quant_storage", None), "itemsize", 1)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
