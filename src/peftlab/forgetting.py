"""Forgetting: general-knowledge sets the runs never train on, scored before and after training.

Forgetting is evaluation, not a method. Each set under `evaluate.forgetting` is data with a task of
its own (MMLU general subjects by `lm_multiple_choice`, TriviaQA by `lm_generation`, Wikipedia
paragraphs by `lm_text`'s per-token cross-entropy, PEFT's measure). The base model (the pretrained
weights, as the untrained baseline loads them) is scored once per set and kept under
`_baselines/forgetting/`, keyed by a fingerprint of everything that decides its score, so groups of a
multi-task experiment that share a set share its base score. Every run is scored on the same rows;
its metrics.json records base, run and change (run minus base) per set, so the report needs nothing else.

Forgetting sets are not part of a run's settings fingerprint: adding or changing one does not retrain
anything. A finished run whose record lacks a set (or has it for other rows or settings) is scored
from its saved adapter, and the result kept in `<run>/forgetting.json` (one atomic file beside the
run's integrity-checked ones); `run_record` merges both.

Measures of forgetting in the literature: the drop on general benchmarks (Biderman et al. 2024,
"LoRA Learns Less and Forgets Less"), and the rise of cross-entropy on general text (PEFT's
method_comparison). Both are plain differences here; the report says which direction is worse.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab import faults
from peftlab.config import DataSpec, ForgettingSpec
from peftlab.errors import InputError
from peftlab.integrity import fingerprint
from peftlab.store import RunDir, read_json, write_json, write_jsonl
from peftlab.tasks import TASKS, Task

if TYPE_CHECKING:
    from datasets import Dataset

    from peftlab.config import LoadedExperiment

Log = Callable[[str], None]
FOLDER = "forgetting"


@dataclass
class ForgettingSet:
    """One forgetting set, read and tokenized once per experiment group."""

    name: str
    task: Task
    task_name: str
    examples: Dataset
    features: Dataset
    where: str
    key: dict[str, Any]  # what decides the base model's score: fingerprinted for the base file

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    @property
    def primary(self) -> str:
        return self.task.primary_metric


def prepare_sets(
    exp: LoadedExperiment, main: Task, tokenizer: Any, model_ref: str, precision: str
) -> list[ForgettingSet]:
    """Read, check and tokenize every forgetting set of one group (InputError names the set).

    A set without its own task is read by the experiment's task as prepared (its fitted labels)."""
    assert exp.task is not None
    out = []
    for name, item in exp.spec.evaluate.forgetting.items():
        default = {"name": exp.task.name, **main.state()}
        try:
            out.append(_prepare_one(exp, name, item, default, tokenizer, model_ref, precision))
        except InputError as exc:  # the set's own max_length is the key to raise, not data.max_length
            message = str(exc).replace("data.max_length", f"evaluate.forgetting.{name}.max_length")
            raise InputError(f"{exp.path}: evaluate.forgetting.{name}: {message}") from None
    return out


def _prepare_one(
    exp: LoadedExperiment,
    name: str,
    item: ForgettingSpec,
    default: dict[str, Any],
    tokenizer: Any,
    model_ref: str,
    precision: str,
) -> ForgettingSet:
    from peftlab.data.loading import load_rows, sample  # datasets: loaded when a set is read, not for the report

    spec = exp.spec
    assert spec.data is not None
    given = item.task if item.task is not None else default
    options = {"name": given} if isinstance(given, str) else dict(given)
    task_name = str(options.pop("name"))
    task = TASKS.get(task_name)(**options)
    max_length = item.max_length or spec.data.max_length
    assert max_length is not None
    data = DataSpec(source=item.source, config_name=item.config_name, max_length=max_length)
    rows, where = load_rows(data, item.split, exp.base_dir)
    try:
        examples = task.examples_from_rows(rows, where)
    except RuntimeError as exc:  # a task that fits its labels on training data it does not have here
        raise InputError(f"task {task_name} cannot read these rows without its labels given ({exc})") from None
    if len(examples) == 0:
        raise InputError(f"{where}: no examples")
    if item.limit is not None:
        examples = sample(examples, item.limit, spec.data.seed)
    features = task.predict_features(examples, tokenizer, max_length)
    key = {
        "model": model_ref,
        "set": item.model_dump(),
        "task": {"name": task_name, **task.state()},
        "max_length": max_length,
        "precision": precision,
        "rows": _content_hash(examples),  # every row scored, so a rebuilt asset is not mistaken for the old
    }
    return ForgettingSet(name, task, task_name, examples, features, where, key)


def _content_hash(examples: Dataset) -> str:
    import hashlib
    import json

    digest = hashlib.sha256()
    for row in examples:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def score_set(
    fset: ForgettingSet, model: Any, tokenizer: Any, train: Any, precision: str, predictions: Path
) -> dict[str, Any]:
    """One set's metrics for `model`; its predictions are written to `predictions`."""
    faults.point("forgetting")
    model.eval()
    outputs, seconds = fset.task.model_outputs(model, fset.features, tokenizer, train, precision)
    records = fset.task.predict(outputs, fset.examples, fset.features)
    write_jsonl(predictions, records)
    return {**fset.task.score(records), "eval_seconds": round(seconds, 3)}


def base_file(store_path: Path, fset: ForgettingSet) -> Path:
    return store_path / "_baselines" / FOLDER / f"{fset.name}-{fset.fingerprint}.json"


def ensure_base(
    sets: list[ForgettingSet], store_path: Path, build_base: Callable[[], Any], tokenizer: Any, train: Any, log: Log
) -> dict[str, dict[str, Any]]:
    """The base model's metrics per set: read from `_baselines/forgetting/`, or measured (once) and kept."""
    from peftlab.engine import resolve_precision

    out: dict[str, dict[str, Any]] = {}
    missing = []
    for fset in sets:
        found = read_json(base_file(store_path, fset))
        if isinstance(found, dict) and isinstance(found.get("metrics"), dict):
            out[fset.name] = found["metrics"]
        else:
            missing.append(fset)
    if not missing:
        return out
    log(f"forgetting: scoring the base model on {', '.join(f.name for f in missing)} ...")
    model = build_base()
    precision = resolve_precision(train.precision)
    for fset in missing:
        path = base_file(store_path, fset)
        metrics = score_set(fset, model, tokenizer, train, precision, path.with_suffix(".predictions.jsonl"))
        write_json(path, {"set": fset.name, "where": fset.where, "key": fset.key, "metrics": metrics})
        out[fset.name] = metrics
    return out


def evaluate_run(
    sets: list[ForgettingSet],
    model: Any,
    base: dict[str, dict[str, Any]],
    tokenizer: Any,
    train: Any,
    precision: str,
    predictions_dir: Path,
    log: Log,
    label: str = "",
) -> dict[str, Any]:
    """Every set scored for a trained run, beside the base model's scores: what metrics.json keeps.

    A set that fails to score (e.g. out of memory while generating) is recorded with its error and the
    others go on: the run's training and in-domain results are not lost to an evaluation."""
    out: dict[str, Any] = {}
    for fset in sets:
        started = time.perf_counter()
        path = predictions_dir / f"forgetting-{fset.name}.jsonl"
        try:
            metrics = score_set(fset, model, tokenizer, train, precision, path)
        except (RuntimeError, ValueError, MemoryError) as exc:
            out[fset.name] = {"key": fset.fingerprint, "metric": fset.primary, "error": f"{type(exc).__name__}: {exc}"}
            log(f"[{label}] forgetting {fset.name}: FAILED ({type(exc).__name__}: {exc})")
            continue
        out[fset.name] = record(fset, base[fset.name], metrics)
        change = out[fset.name]["change"].get(fset.primary)
        shown = f"{change:+.4f}" if isinstance(change, int | float) else "—"
        log(
            f"[{label}] forgetting {fset.name}: {fset.primary} {metrics.get(fset.primary, float('nan')):.4f} "
            f"(base {base[fset.name].get(fset.primary, float('nan')):.4f}, change {shown}) "
            f"in {time.perf_counter() - started:.0f}s"
        )
    return out


REFRESHED = "forgetting.json"


def run_record(folder: RunDir) -> dict[str, Any]:
    """A finished run's forgetting record: metrics.json's, with later scorings (forgetting.json) over it."""
    record = dict(folder.metrics().get("forgetting") or {})
    later = read_json(folder.path / REFRESHED, {}) or {}
    record.update(later.get("sets") or {})
    return record


def stale(sets: list[ForgettingSet], record: dict[str, Any]) -> list[ForgettingSet]:
    """The sets a finished run has no current score for (never scored, other rows or settings, failed)."""
    return [f for f in sets if (record.get(f.name) or {}).get("key") != f.fingerprint or "error" in record[f.name]]


def refresh(sets: list[ForgettingSet], folder: RunDir, base: dict[str, dict[str, Any]], log: Log) -> None:
    """Score a finished run's saved model on the sets it lacks; kept in <run>/forgetting.json."""
    missing = stale(sets, run_record(folder))
    if not missing or not folder.adapter_dir.exists():
        return
    from peftlab.trained import load_run

    log(f"[{folder.name}] forgetting: scoring the saved model on {', '.join(f.name for f in missing)} ...")
    run = load_run(folder.path)
    new = evaluate_run(
        missing, run.model, base, run.tokenizer, run.train, run.precision, folder.predictions_dir, log, folder.name
    )
    later = read_json(folder.path / REFRESHED, {}) or {}
    write_json(folder.path / REFRESHED, {"sets": {**(later.get("sets") or {}), **new}})


def record(fset: ForgettingSet, base: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """Base, run and change (run minus base) of one set, with what the report needs to read them."""
    return {
        "key": fset.fingerprint,
        "task": fset.task_name,
        "where": fset.where,
        "n": len(fset.examples),
        "metric": fset.primary,
        "higher_is_better": fset.task.higher_is_better.get(fset.primary, True),
        "score_scale": fset.task.score_scale,
        "base": base,
        "run": run,
        "change": changes(base, run),
    }


def changes(base: dict[str, Any], run: dict[str, Any]) -> dict[str, float]:
    """run − base for every scalar metric both have (counts and timings excluded)."""
    skip = {"n", "tokens", "eval_seconds"}
    return {
        key: float(run[key]) - float(base[key])
        for key in run
        if key in base
        and key not in skip
        and isinstance(run[key], int | float)
        and isinstance(base[key], int | float)
        and not isinstance(run[key], bool)
    }


def forgetting_of(entry: dict[str, Any]) -> float | None:
    """How much worse the run is than the base on the set's metric, as a fraction of a perfect score
    (accuracy points / 1.0, cross-entropy in nats): positive = forgot, negative = improved."""
    change = entry.get("change", {}).get(entry.get("metric"))
    if not isinstance(change, int | float):
        return None
    scale = float(entry.get("score_scale") or 1.0)
    return (-change if entry.get("higher_is_better", True) else change) / scale
