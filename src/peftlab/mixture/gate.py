"""The gates that weigh LoRA experts per token: one small gate per adapted layer, or X-LoRA's global one.

Written here rather than taken from PEFT's X-LoRA: its classifier is tied to its model wrapper, which
renames adapter keys for decoders only and saves gate layers whose index equals an expert name under
the wrong keys (see ../shared/notes/analysis-and-mixture.md). The maths is the same: logits per
(token, layer, expert), divided by a temperature, optionally cut to the top k, softmax over experts.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


def mlp(width_in: int, width_out: int, depth: int, hidden: int) -> nn.Sequential:
    """`depth` linear maps (ReLU between them); the last starts at zero, so every gate starts as the
    uniform mix of its experts (the strongest untrained baseline) and learns away from it."""
    widths = [width_in, *([hidden] * (depth - 1)), width_out]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < depth - 1:
            layers.append(nn.ReLU())
    last = layers[-1]
    assert isinstance(last, nn.Linear)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers)


def expert_weights(
    logits: torch.Tensor, *, temperature: float, top_k: int | None, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax over the last axis (experts) of logits / temperature; experts not `allowed` (a bool mask
    over experts: absent from the layer, or masked for an ablation) and, with top_k, all but the k
    highest get exactly zero."""
    logits = logits.float() / temperature
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a token with no allowed expert: all zero


class LayerwiseGate(nn.Module):
    """One gate per adapted layer, reading that layer's own input (MoLE-style; one forward pass)."""

    def __init__(self, widths: list[int], experts: int, depth: int, hidden: int) -> None:
        super().__init__()
        self.experts = experts
        self.layers = nn.ModuleList(mlp(w, experts, depth, hidden) for w in widths)

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Logits [..., experts] for the tokens x [..., width] entering adapted layer `layer`."""
        gate = self.layers[layer]
        return gate(x.to(gate[0].weight.dtype))


class GlobalGate(nn.Module):
    """X-LoRA's scaling head: from the last hidden state of a pass without adapters, logits for every
    (adapted layer, expert) at once; the real pass then uses them (two passes per step)."""

    def __init__(self, hidden_size: int, layers: int, experts: int, depth: int, hidden: int) -> None:
        super().__init__()
        self.n_layers, self.experts = layers, experts
        self.net = mlp(hidden_size, layers * experts, depth, hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits [..., layers, experts] from hidden states [..., hidden_size]."""
        out = self.net(hidden_states.to(self.net[0].weight.dtype))
        return out.unflatten(-1, (self.n_layers, self.experts))


def gate_parameter_count(widths: list[int], experts: int, depth: int, hidden: int, *, global_from: int | None) -> int:
    """Weights of a gate, by the formula the docs give (checked against the built modules in the tests):
    a stack of `depth` linear maps d_in -> hidden -> ... -> out has
    depth 1: d_in·out + out;  depth >= 2: (d_in·S + S) + (depth − 2)(S² + S) + (S·out + out), S = hidden.
    layerwise: one stack per adapted layer (d_in = its input width, out = experts);
    global: one stack, d_in = the hidden size, out = layers × experts."""

    def stack(d_in: int, out: int) -> int:
        if depth == 1:
            return d_in * out + out
        return (d_in * hidden + hidden) + (depth - 2) * (hidden * hidden + hidden) + (hidden * out + out)

    if global_from is not None:
        return stack(global_from, len(widths) * experts)
    return sum(stack(w, experts) for w in widths)
