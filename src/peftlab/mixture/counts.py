"""A mixture's parameters without weights or data (for `peftlab plan`): its architecture assembled on
PyTorch's meta device from the experts' LoRA settings and tasks, then counted, beside the formula."""

from __future__ import annotations

from typing import Any

import torch

from peftlab.mixture.gate import gate_parameter_count
from peftlab.mixture.model import assemble, parameter_counts
from peftlab.mixture.settings import MixtureSpec


def mixture_counts(
    experts: dict[str, tuple[Any, Any]], source: Any, tokenizer: Any, spec: MixtureSpec
) -> dict[str, int]:
    """experts: key -> (fitted Task, LoraConfig). The counts of `parameter_counts`, plus `gate_formula`:
    the gate's weights by the documented formula (gate.gate_parameter_count), which must agree."""
    with torch.device("meta"):
        models = {key: task.build_model(source, tokenizer, weights=False) for key, (task, _) in experts.items()}
        mixture = assemble(models, {key: config for key, (_, config) in experts.items()}, spec)
    counts = parameter_counts(mixture)
    widths = [int(layer.in_features) for _, layer in mixture.layers]
    backbone = mixture.peft.base_model.model
    hidden = int(getattr(backbone.config, "hidden_size", 0) or getattr(backbone.config, "dim", 0))
    counts["gate_formula"] = gate_parameter_count(
        widths, len(experts), spec.depth, spec.gate_size, global_from=hidden if spec.gate == "global" else None
    )
    counts["layers"] = len(widths)
    return counts
