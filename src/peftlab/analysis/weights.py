"""What training did to the weights: ΔW per matrix, its spectrum, and the directions it brought in.

Every method hands over its own exact ΔW (`Method.weight_changes`: LoRA B·A·scale, (IA)3 W·(diag(l) − I),
full fine-tuning W − W0), so the measures below are one code path for all of them. For methods that
change every weight, the matrices a LoRA would adapt are looked at in detail and the rest summarised
(their relative change per matrix type), so methods are compared on the same matrices.

SVDs run in float32, one batched call per group of same-shaped matrices (torch.linalg.svd on a stack is
several times faster than matrix by matrix on a CPU).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from peftlab.analysis import measures

if TYPE_CHECKING:
    from peftlab.analysis.settings import WeightsSpec
    from peftlab.methods.base import WeightChange

SPECTRUM = 64  # singular values kept per matrix type for the report's curves
TOP = 16  # singular values kept per matrix in analysis.json
BASIS = 64  # right-singular directions kept per matrix for cross-run subspace similarity

_LAYER = re.compile(r"\.(?:layers?|h|blocks?)\.(\d+)\.")


def layer_and_type(name: str) -> tuple[int | None, str]:
    """(layer index, matrix type) from a module path: 'bert.encoder.layer.3.attention.self.query' -> (3, 'query').

    The type is the last name part, except where that is ambiguous (BERT's `dense` is the attention
    output, the feed-forward input and its output): then the path after the layer index."""
    found = _LAYER.search(f".{name}.")
    kind = name.split(".")[-1]
    if kind == "dense":
        kind = name[found.end() - 1 :] if found else ".".join(name.split(".")[-2:])
    return (int(found.group(1)) if found else None), kind


def in_focus(name: str, matrices: Iterable[str]) -> bool:
    """Whether a module is one of `matrices` (names or suffixes, as PEFT's target_modules match)."""
    return any(name == m or name.endswith(f".{m}") for m in matrices)


def analyze_weights(
    changes: Iterable[WeightChange], spec: WeightsSpec, focus: list[str] | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The weights part of analysis.json, and the subspace bases kept for cross-run comparisons.

    `focus`: the matrices to measure in detail (None: all that changed); the others are summarised."""
    detailed: list[WeightChange] = []
    rest: list[dict[str, Any]] = []
    for change in changes:
        if focus is None or in_focus(change.name, focus):
            detailed.append(change)
        else:
            rest.append(_relative(change))
    matrices, bases, spectra = [], {}, defaultdict(list)
    for group in _same_shapes(detailed):
        # one SVD of each ΔW (batched per shape) serves the spectrum, amplification and the subspace basis
        svd = torch.linalg.svd(torch.stack([c.delta.float() for c in group]), full_matrices=False)
        for i, (change, found) in enumerate(zip(group, _intruders(group, spec), strict=True)):
            u, sv, vh = svd.U[i], svd.S[i], svd.Vh[i]
            entry = _matrix_entry(change, sv, (u, vh), found)
            matrices.append(entry)
            spectra[entry["type"]].append(sv[:SPECTRUM])
            if float(change.delta.abs().max()) > 0:
                basis = measures.right_basis(change.factor, BASIS) if change.factor is not None else vh[:BASIS].T
                bases[change.name] = basis.contiguous()
    matrices.sort(key=lambda m: (m["layer"] if m["layer"] is not None else -1, m["name"]))
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in matrices:
        by_type[entry["type"]].append(entry)
    return {
        "matrices": matrices,
        "summary": summarize(matrices),
        "by_type": {kind: summarize(entries) for kind, entries in by_type.items()},
        "spectra": {kind: _mean_spectrum(values) for kind, values in spectra.items()},
        "rest": _rest_summary(rest),
    }, bases


def _same_shapes(changes: list[WeightChange]) -> list[list[WeightChange]]:
    groups: dict[tuple[int, ...], list[WeightChange]] = defaultdict(list)
    for change in changes:
        groups[tuple(change.delta.shape)].append(change)
    return list(groups.values())


def _intruders(group: list[WeightChange], spec: WeightsSpec) -> list[dict[str, Any]]:
    """Intruder dimensions of same-shaped matrices: two batched SVDs (W0 and W0 + ΔW) for the group."""
    base = torch.stack([c.base for c in group])
    tuned = torch.stack([c.base + c.delta for c in group])
    return measures.intruders_batched(base, tuned, top_k=spec.top_k, epsilon=spec.epsilon)


def _matrix_entry(
    change: WeightChange, sv: torch.Tensor, vectors: tuple[torch.Tensor, torch.Tensor], found: dict[str, Any]
) -> dict[str, Any]:
    layer, kind = layer_and_type(change.name)
    norm = float(change.delta.norm())
    base_norm = float(change.base.norm())
    k90 = measures.k_energy(sv, 0.9)
    r = change.rank_limit or max(k90, 1)  # Hu et al. use the adapter's rank; without one, the rank that holds 90%
    return {
        "name": change.name,
        "layer": layer,
        "type": kind,
        "shape": list(change.delta.shape),
        "rank_limit": change.rank_limit,
        "norm": norm,
        "relative_change": norm / base_norm if base_norm else None,
        "effective_rank": measures.effective_rank(sv),
        "stable_rank": measures.stable_rank(sv),
        "k90": k90,
        "amplification": measures.amplification(change.delta, change.base, r, vectors=vectors) if norm > 0 else None,
        "amplification_r": r,
        "intruders": found["count"],
        "intruders_by_epsilon": found["by_epsilon"],
        "intruder_energy": found["energy"],
        "top_singular": [float(v) for v in sv[:TOP]],
    }


def _relative(change: WeightChange) -> dict[str, Any]:
    base_norm = float(change.base.norm())
    return {
        "type": layer_and_type(change.name)[1],
        "relative_change": float(change.delta.norm()) / base_norm if base_norm else None,
    }


SUMMED = ("intruders",)
AVERAGED = ("relative_change", "effective_rank", "stable_rank", "k90", "intruder_energy", "amplification")


def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over matrices (totals for intruder counts); nan-free: a measure no matrix has is None."""
    out: dict[str, Any] = {"matrices": len(entries)}
    for key in AVERAGED:
        values = [e[key] for e in entries if isinstance(e.get(key), int | float) and e[key] == e[key]]
        out[key] = sum(values) / len(values) if values else None
    out["intruders"] = sum(int(e["intruders"]) for e in entries)
    out["intruders_per_matrix"] = out["intruders"] / len(entries) if entries else None
    by_eps: dict[str, int] = defaultdict(int)
    for entry in entries:
        for eps, count in entry["intruders_by_epsilon"].items():
            by_eps[eps] += int(count)
    out["intruders_by_epsilon"] = dict(by_eps)
    return out


def _mean_spectrum(values: list[torch.Tensor]) -> list[float]:
    length = min(len(v) for v in values)
    return [sum(float(v[i]) for v in values) / len(values) for i in range(length)]


def _rest_summary(rest: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not rest:
        return None
    values = [r["relative_change"] for r in rest if r["relative_change"] is not None]
    by_type: dict[str, list[float]] = defaultdict(list)
    for r in rest:
        if r["relative_change"] is not None:
            by_type[r["type"]].append(r["relative_change"])
    return {
        "matrices": len(rest),
        "relative_change": sum(values) / len(values) if values else None,
        "by_type": {kind: sum(v) / len(v) for kind, v in by_type.items()},
    }
