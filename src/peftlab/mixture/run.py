"""A mixture's run: check the experts, build the mixture, train the gate, score it per task beside the
baselines that make it honest, look inside the gate, save, and reload.

The folder is runs/<experiment>/_mixtures/<name>/ (beside _baselines: not a run of one task):
config.yaml (settings and the experts' weight hashes; its fingerprint decides whether a finished
mixture is reused), status.json, metrics.json (every configuration's scores per task, the gate's
weights per layer and expert, counts, times), predictions/<task>.jsonl (the learned gate's) and
adapter/ (gate.safetensors, heads.safetensors, mixture.json: what `load_mixture` rebuilds it from).
"""

from __future__ import annotations

import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from peftlab import engine, faults
from peftlab.config import DataSpec, TrainSpec
from peftlab.data.loading import load_splits, sample
from peftlab.errors import InputError
from peftlab.integrity import fingerprint, sha256_file
from peftlab.mixture.experts import Expert, check_experts, read_expert
from peftlab.mixture.model import Mixture, build_mixture, head_state, parameter_counts, weight_bytes
from peftlab.mixture.resolve import expert_folders
from peftlab.mixture.settings import FOLDER, LEARNED, UNIFORM, MixtureSpec
from peftlab.mixture.train import TaskBatches, train_gate
from peftlab.store import DONE, FAILED, RUNNING, RunDir, parse_json, read_text, write_json, write_jsonl, write_yaml
from peftlab.tasks import Task

Log = Callable[[str], None]


@dataclass
class TaskData:
    """One expert's task: its examples and features for training and for scoring."""

    expert: Expert
    task: Task
    train: Dataset  # model inputs
    examples: Dataset  # scored examples of `split`
    features: Dataset  # their prediction features
    split: str


def run_mixtures(exp: Any, log: Log) -> list[str]:
    """Train and score every mixture of the experiment (exp: config.LoadedExperiment); the names that failed."""
    failed = []
    for name, spec in (exp.spec.mixtures or {}).items():
        folder = RunDir(exp.runs_dir / FOLDER / name)
        try:
            experts = [read_expert(p) for p in expert_folders(exp.spec, spec, exp.runs_dir, exp.base_dir)]
            check_experts(experts)
            run_mixture(name, spec, experts, folder, exp.base_dir, log)
        except KeyboardInterrupt:
            if folder.path.exists():
                folder.set_status(FAILED, error="interrupted (KeyboardInterrupt); run again to train it")
            raise
        except Exception as exc:
            message = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
            log(f"[mixture {name}] FAILED: {message}")
            folder.path.mkdir(parents=True, exist_ok=True)
            (folder.path / "error.log").write_text(traceback.format_exc())
            folder.set_status(FAILED, error=message, traceback="error.log")
            failed.append(f"{FOLDER}/{name}")
    return failed


def check_outside_experts(exp: Any) -> None:
    """Experts listed as folders outside this experiment exist now: check them before anything trains
    (this experiment's own runs are checked when the mixture starts, after they have trained)."""
    runs_dir = exp.runs_dir.resolve()
    for name, spec in (exp.spec.mixtures or {}).items():
        folders = expert_folders(exp.spec, spec, exp.runs_dir, exp.base_dir)
        outside = [p for p in folders if runs_dir not in p.resolve().parents]
        try:
            experts = [read_expert(p) for p in outside]
            if len(outside) == len(folders):
                check_experts(experts)
        except InputError as exc:
            raise InputError(f"{exp.path}: mixtures.{name}.experts: {exc}") from None


def mixture_config(name: str, spec: MixtureSpec, experts: list[Expert]) -> dict[str, Any]:
    body = {
        "mixture": name,
        "method": spec.method,
        "settings": spec.model_dump(),
        "experts": [{"name": e.name, "folder": str(e.folder), "sha256": e.sha256} for e in experts],
    }
    return {**body, "fingerprint": fingerprint(body)}


def run_mixture(name: str, spec: MixtureSpec, experts: list[Expert], folder: RunDir, base_dir: Path, log: Log) -> None:
    """Train, score and save one mixture unless it is done with the same settings and experts."""
    label = f"mixture {name}"
    config = mixture_config(name, spec, experts)
    same = folder.status().get("state") == DONE and folder.config().get("fingerprint") == config["fingerprint"]
    if same and folder.damage(deep=False) is None:
        log(f"[{label}] done already: skipped")
        return
    if folder.path.exists():  # other settings or experts, or an attempt cut short: keep it aside, start clean
        backup = folder.path.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.path.rename(backup)
        log(f"[{label}] the earlier mixture (other settings or unfinished) moved to {backup.name}")
    source, tokenizer = _base(experts)
    data = {e.name: task_data(e, spec, tokenizer, base_dir) for e in experts}  # bad data fails before training
    folder.path.mkdir(parents=True, exist_ok=True)
    write_yaml(folder.config_file, config)
    folder.set_status(RUNNING, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    precision = engine.resolve_precision(spec.train.precision)
    mixture = build_mixture(experts, spec, source, tokenizer, spec.train.seed)
    counts = parameter_counts(mixture)
    log(
        f"[{label}] {len(experts)} experts ({', '.join(e.name for e in experts)}), gate {spec.gate}: "
        f"{counts['trainable']:,} trainable of {counts['total']:,} parameters, {len(mixture.layers)} adapted layers"
    )
    batches = {k: TaskBatches(d.train, d.task.collator(tokenizer)) for k, d in data.items()}
    trained = train_gate(mixture, batches, spec.train, precision, log, label)
    faults.point("mixture_trained")
    predict_spec = TrainSpec(
        batch_size=spec.train.batch_size, lr=spec.train.lr, precision=precision, seed=spec.train.seed
    )
    scored = score_configurations(mixture, data, spec, tokenizer, predict_spec, precision, folder, log, label)
    save_mixture(mixture, experts, folder.adapter_dir)
    metrics = {
        "mixture": name,
        "method": spec.method,
        "settings": spec.model_dump(),
        "experts": [_expert_entry(e, data[e.name]) for e in experts],
        "layers": [n for n, _ in mixture.layers],
        "params": counts,
        "train": {**trained, "examples": {k: len(d.train) for k, d in data.items()}},
        **scored,
        "precision": precision,
        "hardware": engine.hardware(),
        "versions": engine.versions(),
    }
    write_json(folder.metrics_file, metrics)
    folder.record_done(finished=time.strftime("%Y-%m-%dT%H:%M:%S"), train_seconds=trained["train_seconds"])
    log(f"[{label}] done: " + ", ".join(f"{k} {_primary(metrics, k, LEARNED):.4f}" for k in data))


def _primary(metrics: dict[str, Any], task: str, configuration: str) -> float:
    expert = next(e for e in metrics["experts"] if e["name"] == task)
    return float(metrics["scores"][configuration][task][expert["primary_metric"]])


def _expert_entry(expert: Expert, data: TaskData) -> dict[str, Any]:
    task = data.task
    return {
        "name": expert.name,
        "folder": str(expert.folder),
        "sha256": expert.sha256,
        "task": expert.config["task"]["name"],
        "primary_metric": task.primary_metric,
        "higher_is_better": task.higher_is_better.get(task.primary_metric, True),
        "score_scale": task.score_scale,
        "split": data.split,
        "examples": len(data.examples),
    }


def _base(experts: list[Expert]) -> tuple[Any, Any]:
    """The shared base model's source and the tokenizer the experts were trained with (the first's)."""
    from transformers import AutoTokenizer

    from peftlab.models import ensure_pad_token, resolve_model

    source = resolve_model(experts[0].config["model"])
    return source, ensure_pad_token(AutoTokenizer.from_pretrained(experts[0].folder / "adapter"))


def task_data(expert: Expert, spec: MixtureSpec, tokenizer: Any, base_dir: Path) -> TaskData:
    """The expert's own data (its run's data settings): training rows and the scored split's examples."""
    evaluated = (RunDir(expert.folder).metrics().get("eval") or {}).keys()
    split = spec.evaluate.split if spec.evaluate.split in evaluated else "validation"
    data = DataSpec.model_validate(expert.config["data"])
    task = expert.task()
    try:
        examples = task.prepare(
            load_splits(data, base_dir, tuple(dict.fromkeys(("train", "validation", split)))), str(expert.folder)
        )
    except InputError as exc:
        raise InputError(f"expert {expert.folder}: its data: {exc}") from None
    train = examples["train"]
    if spec.train.limit is not None:
        train = sample(train, spec.train.limit, data.seed)
    scored = examples[split]
    if spec.evaluate.limit is not None:
        scored = sample(scored, spec.evaluate.limit, data.seed)
    features = task.featurize(train, tokenizer, expert.max_length)
    return TaskData(
        expert,
        task,
        task.model_inputs(features),
        scored,
        task.predict_features(scored, tokenizer, expert.max_length),
        split,
    )


def configurations(
    mixture: Mixture, spec: MixtureSpec
) -> Iterator[tuple[str, str, Callable[[], AbstractContextManager]]]:
    """(name, kind, context) of every configuration scored: the learned gate, the uniform mix, each
    expert alone (a one-hot mix: exactly that expert), PEFT's static merges, the gate without each expert."""
    n = len(mixture.names)
    yield LEARNED, "mixture", nullcontext
    yield UNIFORM, "baseline", lambda: mixture.fixed([1 / n] * n)
    for i, name in enumerate(mixture.names):
        yield f"expert {name}", "expert", lambda i=i: mixture.fixed([1.0 if j == i else 0.0 for j in range(n)])
    for merge in spec.evaluate.merges:
        yield f"merge {merge}", "merge", lambda merge=merge: mixture.merged(merge, spec.evaluate.density)
    if spec.evaluate.ablation:
        for i, name in enumerate(mixture.names):
            yield f"without {name}", "ablation", lambda i=i: mixture.masked(i)


def score_configurations(
    mixture: Mixture,
    data: dict[str, TaskData],
    spec: MixtureSpec,
    tokenizer: Any,
    predict_spec: TrainSpec,
    precision: str,
    folder: RunDir,
    log: Log,
    label: str,
) -> dict[str, Any]:
    """Scores of every configuration on every task, the learned gate's weights, inference times."""
    scores: dict[str, dict[str, Any]] = {}
    kinds: dict[str, str] = {}
    failed: dict[str, str] = {}
    gate: dict[str, Any] = {}
    for name, kind, context in configurations(mixture, spec):
        kinds[name] = kind
        try:
            with context():
                scores[name] = {}
                for key, d in data.items():
                    if name == LEARNED:
                        with mixture.recording() as record:
                            metrics, predictions = predict(mixture, key, d, tokenizer, predict_spec, precision)
                        gate[key] = _gate_summary(record.summary(), mixture.names.index(key))
                        write_jsonl(folder.predictions_dir / f"{key}.jsonl", predictions)
                    else:
                        metrics, _ = predict(mixture, key, d, tokenizer, predict_spec, precision)
                    scores[name][key] = metrics
        except Exception as exc:  # a merge PEFT refuses (e.g. linear over different ranks) is a finding
            if kind != "merge":
                raise
            failed[name] = f"{type(exc).__name__}: {exc}"
            scores.pop(name, None)
            log(f"[{label}] {name}: could not be scored ({failed[name]})")
            continue
        summary = ", ".join(f"{k} {_score(m, data[k].task):.4f}" for k, m in scores[name].items())
        log(f"[{label}] {name}: {summary}")
    return {
        "scores": scores,
        "kinds": kinds,
        "failed": failed,
        "gate": gate,
        "inference": inference_times(data, scores, tokenizer, predict_spec, precision),
    }


def _score(metrics: dict[str, Any], task: Task) -> float:
    return float(metrics[task.primary_metric])


def predict(
    mixture: Mixture, key: str, d: TaskData, tokenizer: Any, spec: TrainSpec, precision: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One task's predictions through the mixture as it is set, scored; with the seconds it took."""
    outputs, seconds = d.task.model_outputs(mixture.view(key), d.features, tokenizer, spec, precision)
    predictions = d.task.predict(outputs, d.examples, d.features)
    return {**d.task.score(predictions), "eval_seconds": round(seconds, 3)}, predictions


def _gate_summary(summary: dict[str, Any], own: int) -> dict[str, Any]:
    weights = summary["weights"]
    layers = max(1, len(weights))
    return {
        **summary,
        "own_share": round(sum(row[own] for row in weights) / layers, 6),
        "mean_entropy": round(sum(summary["entropy"]) / max(1, len(summary["entropy"])), 6),
    }


def inference_times(
    data: dict[str, TaskData], scores: dict[str, Any], tokenizer: Any, spec: TrainSpec, precision: str
) -> dict[str, Any]:
    """The mixture's prediction time per task beside its expert's own model on the same examples (the
    expert run reloaded as it was saved: one LoRA adapter), and whether their predictions agree with the
    one-hot mix (they must: the one-hot mix is that expert)."""
    from peftlab.methods import count_parameters
    from peftlab.trained import load_run

    out = {}
    for key, d in data.items():
        run = load_run(d.expert.folder)
        outputs, seconds = d.task.model_outputs(run.model, d.features, tokenizer, spec, precision)
        single = d.task.predict(outputs, d.examples, d.features)
        out[key] = {
            "mixture_seconds": scores.get(LEARNED, {}).get(key, {}).get("eval_seconds"),
            "expert_seconds": round(seconds, 3),
            "examples": len(d.examples),
            "single_expert_total": count_parameters(run.model)[1],
            "single_expert_bytes": weight_bytes(run.model),
            "expert_score": _score(d.task.score(single), d.task),
        }
    return out


# --- saving and reloading ---------------------------------------------------------------------------


def save_mixture(mixture: Mixture, experts: list[Expert], directory: Path) -> None:
    """Gate and heads as safetensors, the experts as references with their weights' sha256 (JSON)."""
    from safetensors.torch import save_file

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    gate = {k: v.detach().contiguous() for k, v in mixture.gate.state_dict().items()}
    save_file(gate, str(directory / "gate.safetensors"))
    save_file(head_state(mixture), str(directory / "heads.safetensors"))
    trained = {}
    if mixture.spec.train_experts:  # the experts' matrices changed: they are part of the mixture now
        trained = {
            f"{name}/{layer_name}.{part}": getattr(layer, part)[name].weight.detach().contiguous()
            for layer_name, layer in mixture.layers
            for name in mixture.names
            for part in ("lora_A", "lora_B")
            if name in getattr(layer, part)
        }
        save_file(trained, str(directory / "experts.safetensors"))
    write_json(
        directory / "mixture.json",
        {
            "settings": mixture.spec.model_dump(),
            "experts": [{"name": e.name, "folder": str(e.folder.resolve()), "sha256": e.sha256} for e in experts],
        },
    )


def load_mixture(folder: Path | str) -> Mixture:
    """A saved mixture rebuilt: its experts (checked against the saved hashes), gate and heads."""
    from safetensors.torch import load_file

    directory = Path(folder) / "adapter"
    record = parse_json(read_text(directory / "mixture.json", max_bytes=1 << 20), str(directory / "mixture.json"))
    spec = MixtureSpec.model_validate(record["settings"])
    experts = []
    for ref in record["experts"]:
        path = Path(ref["folder"])
        weights = path / "adapter" / "adapter_model.safetensors"
        if not weights.exists():
            raise InputError(f"expert '{ref['name']}' ({path}) is missing: the mixture cannot be rebuilt without it")
        if sha256_file(weights) != ref["sha256"]:
            raise InputError(f"expert '{ref['name']}' ({path}) changed since the mixture was trained (sha256 differs)")
        experts.append(read_expert(path))
    source, tokenizer = _base(experts)
    mixture = build_mixture(experts, spec, source, tokenizer, spec.train.seed)
    mixture.gate.load_state_dict(load_file(str(directory / "gate.safetensors")))
    heads = load_file(str(directory / "heads.safetensors"))
    for key, model in mixture.tasks.items():
        own = {k.split("/", 1)[1]: v for k, v in heads.items() if k.startswith(f"{key}/")}
        model.load_state_dict(own, strict=False)
    if spec.train_experts:
        for key, value in load_file(str(directory / "experts.safetensors")).items():
            name, rest = key.split("/", 1)
            layer_name, part = rest.rsplit(".", 1)
            getattr(dict(mixture.layers)[layer_name], part)[name].weight.data.copy_(value)
    mixture.eval()
    return mixture
