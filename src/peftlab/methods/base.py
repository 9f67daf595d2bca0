"""What every fine-tuning method provides, and parameter accounting shared by all of them.

A method turns a freshly built task model into the model that is trained (`apply`), saves what
training changed (`save`) and rebuilds the trained model from disk (`load`). It may also ask for
extra `from_pretrained` arguments (`load_kwargs`, e.g. 4-bit quantization for QLoRA) and declares
its default learning rate, because methods that train 0.1% of the weights need far higher rates
than full fine-tuning (see `default_lr` and the README's table).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch
    from torch import nn

# The rebuild callback a method's `load` receives: source=None builds the base task model from the
# experiment's model, source=PATH builds it from a saved full model.
BuildModel = Callable[[str | None], "nn.Module"]


@dataclass
class WeightChange:
    """What training changed in one weight matrix, for `peftlab analyze` (float32, [out, in] layout).

    `factor` is the matrix whose right-singular subspace runs are compared by (LoRA's A, as Hu et al.
    2021 §7.2 compare adapters); None: ΔW's own. `rank_limit` is the most rank ΔW can have (LoRA's r)."""

    name: str  # the module's path in the task model, e.g. bert.encoder.layer.0.attention.self.query
    base: torch.Tensor
    delta: torch.Tensor
    rank_limit: int | None = None
    factor: torch.Tensor | None = None


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

    def analysis_focus(self, model_type: str) -> list[str] | None:
        """The matrices `analysis` looks at in detail (names or suffixes); None: every matrix the method
        changed. A method that changes every weight names the ones to compare with the others."""
        return None

    def weight_changes(self, model: nn.Module, base: Callable[[], nn.Module]) -> Iterator[WeightChange]:
        """ΔW of every weight matrix of the backbone that training changed, beside its W0.

        The default compares the trained model with the base model (`base()` builds it), matrix by
        matrix: right for any method that trains weights in place. Methods with their own parameters
        (LoRA, (IA)3) override this with their exact ΔW, which needs no second model."""
        yield from dense_changes(model, base())

    def reduce_intruders(self, model: nn.Module, strength: float, top_k: int, epsilon: float) -> list[str]:
        """Scale the trained update's intruder dimensions down to `strength` in place (Shuttleworth et al.
        2024's mitigation); returns a line per matrix saying what was found. Only methods with a
        low-rank update to refit support it."""
        from peftlab.errors import InputError

        raise InputError(f"intruder reduction works on LoRA runs, not on {type(self).__name__} runs")

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


def backbone_of(model: nn.Module) -> tuple[str, nn.Module]:
    """The pretrained backbone (transformers' `base_model_prefix`: bert, model, ...) and its name; the
    task head outside it starts from random weights, so its change says nothing about adaptation."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    return (prefix, inner) if inner is not None else ("", model)


def linear_weight(module: nn.Module) -> torch.Tensor | None:
    """A linear layer's weight as float32 [out, in] (GPT-2's Conv1D stores [in, out]); None for other modules."""
    from torch import nn

    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2 or isinstance(module, nn.Embedding):
        return None
    if type(module).__name__ == "Conv1D":
        return weight.detach().float().T
    return weight.detach().float() if isinstance(module, nn.Linear) else None


def dense_changes(tuned: nn.Module, base: nn.Module) -> Iterator[WeightChange]:
    """W − W0 for every linear layer of the backbone, by module name (full fine-tuning's ΔW)."""
    prefix, backbone = backbone_of(tuned)
    _, base_backbone = backbone_of(base)
    before = dict(base_backbone.named_modules())
    for name, module in backbone.named_modules():
        weight = linear_weight(module)
        old = linear_weight(before[name]) if name in before else None
        if weight is None or old is None or old.shape != weight.shape:
            continue
        yield WeightChange(f"{prefix}.{name}" if prefix else name, old, weight - old)
