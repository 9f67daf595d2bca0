"""One run's analysis: weights, drift and attention, written to `<run>/analysis/` and reused.

Two ways in, one code path: right after training (the experiment hands over the model in memory) and
for finished runs (`peftlab analyze`, or an experiment whose `analysis:` block was added later), where
the run is rebuilt from its folder. Results:

- `analysis.json`: the measures (see report/inside.py for how they are shown), the settings, seconds
  per part, and a key (run fingerprint + settings); a part that fails is recorded under `errors` and the
  others go on: analysis never fails a run.
- `subspaces.npz`: per analysed matrix, the top right-singular directions (LoRA: of A; others: of ΔW),
  for cross-run subspace similarity in the report.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.analysis.settings import AnalysisSpec
from peftlab.errors import InputError
from peftlab.integrity import fingerprint
from peftlab.store import RunDir, read_json, write_atomic, write_json

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from torch import nn

    from peftlab.methods.base import Method
    from peftlab.tasks import Task

Log = Callable[[str], None]
VERSION = 1
FOLDER = "analysis"
RESULT = "analysis.json"
BASES = "subspaces.npz"


@dataclass
class Subject:
    """A trained model and what it is compared with: its base model and the same examples per split."""

    name: str
    method_name: str
    method: Method
    model: nn.Module
    build_base: Callable[[], nn.Module]
    model_type: str
    task: Task
    tokenizer: Any
    max_length: int
    examples: dict[str, Dataset]  # split or extra set -> canonical examples (all of them; sampled here)
    run_fingerprint: str
    seed: int = 0


def key_for(run_fingerprint: str, spec: AnalysisSpec, splits: list[str]) -> str:
    return fingerprint({"run": run_fingerprint, "spec": spec.model_dump(), "splits": splits, "version": VERSION})


def current(folder: RunDir, key: str) -> dict[str, Any] | None:
    """The run's analysis when it was made with these settings (and is readable), else None."""
    found = read_json(folder.path / FOLDER / RESULT)
    return found if isinstance(found, dict) and found.get("key") == key else None


def analyze(subject: Subject, spec: AnalysisSpec, out: Path, log: Log) -> dict[str, Any]:
    """Measure every part `spec` asks for; write analysis.json (+ subspaces.npz) under `out`."""
    started = time.perf_counter()
    splits = _chosen_splits(subject, spec)
    result: dict[str, Any] = {
        "version": VERSION,
        "key": key_for(subject.run_fingerprint, spec, splits),
        "run": subject.name,
        "method": subject.method_name,
        "settings": spec.model_dump(),
        "seconds": {},
        "errors": {},
    }
    base: list[nn.Module] = []

    def base_model() -> nn.Module:  # built once, and only if a part needs it
        if not base:
            base.append(subject.build_base().eval())
        return base[0]

    bases: dict[str, torch.Tensor] = {}
    for part in spec.parts:
        part_started = time.perf_counter()
        try:
            if part == "weights":
                result["weights"], bases = _weights(subject, spec, base_model)
            else:
                result[part] = {"splits": _passes(part, subject, spec, splits, base_model)}
        except (RuntimeError, ValueError, TypeError, AttributeError, KeyError, MemoryError) as exc:
            result["errors"][part] = f"{type(exc).__name__}: {exc}"
            log(f"[{subject.name}] analysis {part}: FAILED ({result['errors'][part]})")
        result["seconds"][part] = round(time.perf_counter() - part_started, 2)
    result["seconds"]["total"] = round(time.perf_counter() - started, 2)
    out.mkdir(parents=True, exist_ok=True)
    if bases:
        write_atomic(out / BASES, _npz(bases))
    write_json(out / RESULT, result)
    log(f"[{subject.name}] analysis: {summary_line(result)} in {result['seconds']['total']:.0f}s")
    return result


def _chosen_splits(subject: Subject, spec: AnalysisSpec) -> list[str]:
    if spec.splits is None:
        return list(subject.examples)
    unknown = [s for s in spec.splits if s not in subject.examples]
    if unknown:
        raise InputError(
            f"analysis.splits: {', '.join(unknown)} not evaluated by this run "
            f"(it has: {', '.join(subject.examples) or 'none'})"
        )
    return list(spec.splits)


def _weights(
    subject: Subject, spec: AnalysisSpec, base_model: Callable[[], nn.Module]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from peftlab.analysis.weights import analyze_weights

    assert spec.weights is not None
    focus = (
        spec.weights.matrices
        if spec.weights.matrices is not None
        else subject.method.analysis_focus(subject.model_type)
    )
    changes = subject.method.weight_changes(subject.model, base_model)
    return analyze_weights(changes, spec.weights, focus)


def _passes(
    part: str, subject: Subject, spec: AnalysisSpec, splits: list[str], base_model: Callable[[], nn.Module]
) -> dict[str, Any]:
    from peftlab.analysis import passes
    from peftlab.data.loading import sample  # every run and the base see the same examples

    settings = getattr(spec, part)
    collator = subject.task.collator(subject.tokenizer)
    subject.model.eval()
    out = {}
    for split in splits:
        examples = sample(subject.examples[split], settings.examples, subject.seed)
        features = subject.task.model_inputs(
            subject.task.predict_features(examples, subject.tokenizer, subject.max_length)
        )
        if part == "drift":
            out[split] = passes.drift(base_model(), subject.model, features, collator, settings, subject.seed)
        else:
            out[split] = passes.attention(base_model(), subject.model, features, collator, settings)
    return out


def check_sizes(spec: AnalysisSpec, sizes: dict[str, int], where: str) -> None:
    """InputError (before anything runs) when a pass asks for more examples than a split has."""
    chosen = spec.splits if spec.splits is not None else list(sizes)
    unknown = [s for s in chosen if s not in sizes]
    if unknown:
        raise InputError(
            f"{where}analysis.splits: {', '.join(unknown)} is not evaluated (evaluated: {', '.join(sizes)})"
        )
    for part in ("drift", "attention"):
        settings = getattr(spec, part)
        if settings is None:
            continue
        for split in chosen:
            if settings.examples > sizes[split]:
                raise InputError(
                    f"{where}analysis.{part}.examples: {settings.examples} is larger than the "
                    f"{sizes[split]} examples of '{split}'; ask for at most {sizes[split]}"
                )


def _npz(bases: dict[str, torch.Tensor]) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **{name: tensor.float().numpy() for name, tensor in bases.items()})
    return buffer.getvalue()


def summary_line(result: dict[str, Any]) -> str:
    """One line for the log: the headline of each part that ran."""
    parts = []
    weights = (result.get("weights") or {}).get("summary") or {}
    if weights:
        parts.append(
            f"{weights['matrices']} matrices, effective rank {_num(weights.get('effective_rank'))}, "
            f"k90 {_num(weights.get('k90'))}, intruders {weights.get('intruders')}"
        )
    for part, key, label in (("drift", "cka", "CKA"), ("attention", "js", "JS")):
        for split, values in ((result.get(part) or {}).get("splits") or {}).items():
            parts.append(f"{split} mean {label} {_num(mean_of(values.get(key)))}")
    parts += [f"{part} failed" for part in result.get("errors") or {}]
    return "; ".join(parts) or "nothing measured"


def mean_of(values: Any) -> float | None:
    """Mean of a list (or list of lists) of numbers, None, nan and non-numbers skipped; None when nothing
    is left (also what the report reads files with: a damaged value shows as "—", never a crash)."""
    flat = [
        v for row in (values if isinstance(values, list) else []) for v in (row if isinstance(row, list) else [row])
    ]
    numbers = [float(v) for v in flat if isinstance(v, int | float) and not isinstance(v, bool) and v == v]
    return sum(numbers) / len(numbers) if numbers else None


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "—"
