"""Run an experiment: config -> data -> task -> method -> engine -> metrics -> run store -> report.

Everything that can be wrong with the input is checked in `prepare` before the first run trains:
the config (already validated), the data (fields, labels, limits), the model source, and each
method's settings against the architecture. Each run then trains in turn; a run that fails is
recorded as failed with its error and the others go on. Runs that are done with the same settings
are skipped; interrupted runs resume from their last checkpoint.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, DatasetDict

from peftlab import engine, faults, forgetting, tracking
from peftlab.analysis.finished import analyze_finished
from peftlab.analysis.run import Subject, analyze, check_sizes
from peftlab.config import ExtraEvalSpec, LoadedExperiment, RunSpec, TrainSpec
from peftlab.data.loading import describe_source, load_splits, sample
from peftlab.errors import EXIT_OK, EXIT_RUN_FAILED, InputError, did_you_mean
from peftlab.executor import check_launch, jobs_for, prestart_workers, require_ray, run_in_processes, run_in_ray
from peftlab.integrity import fingerprint
from peftlab.methods import METHODS, Method, count_parameters
from peftlab.mixture.run import check_outside_experts, run_mixtures
from peftlab.models import ModelSource, load_config, load_tokenizer, resolve_model
from peftlab.slices import score_with_sources, source_counts, source_map
from peftlab.store import (
    DONE,
    FAILED,
    RUNNING,
    ExperimentDir,
    ExperimentLock,
    RunDir,
    follow_umask,
    remove_stale_temp_files,
    write_atomic,
    write_json,
    write_jsonl,
    write_yaml,
)
from peftlab.sweep import run_meta, run_protocol
from peftlab.tasks import TASKS, Task
from peftlab.trained import read_extra

Log = Callable[[str], None]


def log_line(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


@dataclass
class Prepared:
    """Everything the runs of one experiment share, built once."""

    exp: LoadedExperiment
    task: Task
    source: ModelSource
    model_type: str
    tokenizer: Any
    examples: DatasetDict
    features: dict[str, Dataset]
    store: ExperimentDir
    predict_features: dict[str, Dataset] = field(default_factory=dict)  # per evaluated split
    sources: dict[str, dict[str, str]] = field(default_factory=dict)  # split -> id -> source (data.sources)
    forgetting: list[forgetting.ForgettingSet] = field(default_factory=list)  # evaluate.forgetting, tokenized

    def inputs(self, split: str) -> Dataset:
        """A split's model inputs (the features without the task's bookkeeping columns)."""
        return self.task.model_inputs(self.features[split])

    @property
    def task_name(self) -> str:
        assert self.exp.task is not None
        return self.exp.task.name


def run_config(prep: Prepared, run: RunSpec) -> dict[str, Any]:
    """The resolved settings of one run, as written to <run>/config.yaml."""
    spec = prep.exp.spec
    method = METHODS.get(run.method)(**run.settings)
    assert spec.model is not None and spec.data is not None
    train = run.train.model_dump()
    if train.get("early_stopping") is None:  # absent unless used: earlier runs keep their fingerprints
        train.pop("early_stopping", None)
    body = {
        "experiment": spec.name,
        "run": run.name,
        "method": run.method,
        "settings": method.resolve(prep.model_type),
        "model": spec.model if isinstance(spec.model, str) else spec.model.model_dump(),
        "task": {"name": prep.task_name, **prep.task.state()},
        "data": spec.data.model_dump(),
        "train": train,
    }
    if run.group:
        body["group"] = dict(run.group)
    if run.data_fraction < 1:
        body["data_fraction"] = run.data_fraction
    if run.eval_splits is not None:
        body["eval_splits"] = list(run.eval_splits)
    meta = run_meta(run)  # where the run sits in a sweep: not a setting, so not fingerprinted
    # How a run is watched (log_every, report_to) changes none of its results: not fingerprinted either,
    # so adding a tracker retrains nothing (and runs from before these settings keep their fingerprints).
    watched = {**body, "train": {k: v for k, v in train.items() if k not in TrainSpec.UNFINGERPRINTED}}
    return {**body, "fingerprint": fingerprint(watched), **({"sweep": meta} if meta else {})}


# --- preparation -----------------------------------------------------------------------------


def prepare(exp: LoadedExperiment, log: Log = log_line) -> Prepared:
    """Load and check data, model source and method settings of one (model, task); nothing trains here."""
    spec = exp.spec
    assert exp.task is not None and spec.data is not None, "prepare() takes one group: exp.groups()"
    task = TASKS.get(exp.task.name)(**exp.task.options)
    for run in exp.runs:
        monitor_for(task, run)  # an early-stopping metric the task does not report fails here
        tracking.check_installed(run.train.report_to)  # a tracker's library missing fails here, not mid-run
    needed = tuple(dict.fromkeys(["train", "validation", *spec.evaluate.splits]))
    log(f"data: {_label(exp)}{describe_source(spec.data)}")
    faults.point("prepare")
    try:
        splits = load_splits(spec.data, exp.base_dir, needed)
        examples = task.prepare(splits, describe_source(spec.data))
    except InputError as exc:
        raise InputError(f"{exp.path}: {exc}") from None
    for name, extra in spec.evaluate.extra.items():
        examples[name] = extra_examples(exp, task, name, extra)
    log(f"data: {_label(exp)}" + ", ".join(f"{name} {len(ds)}" for name, ds in examples.items()))
    source = resolve_model(spec.model, exp.base_dir)
    config, _ = load_config(source)
    for run in exp.runs:  # a method setting the architecture or machine cannot take fails here, not mid-run
        method = METHODS.get(run.method)(**run.settings)
        method.resolve(config.model_type)
        try:
            method.check_runtime()
        except InputError as exc:
            raise InputError(f"{exp.path}: methods.{run.name}: {exc}") from None
        engine.resolve_precision(run.train.precision)
    tokenizer = load_tokenizer(source)
    log(f"model: {source.describe()} ({config.model_type}); tokenizing ...")
    # Most tasks predict from the rows they train on: those are tokenized once and serve both.
    # A task with rows of its own for prediction gets training rows only where training uses them.
    own = type(task).predict_features is not Task.predict_features
    evaluated = spec.evaluate.all_splits()
    trained_on = [s for s in ("train", "validation") if s in examples]
    featurize = _naming_split(exp, task.featurize)
    features = {
        name: featurize(name, examples[name], tokenizer, spec.data.max_length)
        for name in dict.fromkeys([*trained_on, *([] if own else evaluated)])
    }
    predict_features = _naming_split(exp, task.predict_features)
    scoring = {
        s: predict_features(s, examples[s], tokenizer, spec.data.max_length) if own else features[s] for s in evaluated
    }
    _check_monitors_are_measured(exp, task)
    first = exp.runs[0].train if exp.runs else spec.train
    sets = forgetting.prepare_sets(exp, task, tokenizer, str(spec.model), engine.resolve_precision(first.precision))
    if sets:
        log(f"forgetting: {_label(exp)}" + ", ".join(f"{f.name} {len(f.examples)} ({f.task_name})" for f in sets))
    if spec.analysis is not None:  # a pass asking for more examples than a split has fails here, not after training
        check_sizes(spec.analysis, {s: len(examples[s]) for s in evaluated}, f"{exp.path}: {_label(exp)}")
    store = ExperimentDir(exp.runs_dir)
    return Prepared(
        exp, task, source, config.model_type, tokenizer, examples, features, store, scoring, source_map(splits), sets
    )


def _naming_split(exp: LoadedExperiment, tokenize: Callable[..., Dataset]) -> Callable[..., Dataset]:
    """`tokenize` whose input errors name the split's data: the experiment's source, or evaluate.extra.NAME."""
    data = exp.spec.data
    assert data is not None

    def call(split: str, *args: Any) -> Dataset:
        try:
            return tokenize(*args)
        except InputError as exc:
            extra = exp.spec.evaluate.extra.get(split)
            where = f"evaluate.extra.{split} ({extra.source})" if extra else f"{describe_source(data)} [{split}]"
            raise InputError(f"{exp.path}: {_label(exp)}{where}: {exc}") from None

    return call


def extra_examples(exp: LoadedExperiment, task: Task, name: str, extra: ExtraEvalSpec) -> Dataset:
    """More evaluation data (`evaluate.extra`), read with the task's fitted labels; InputError if unfit."""
    assert exp.spec.data is not None
    try:
        return read_extra(task, extra, exp.spec.data.seed, exp.base_dir)
    except InputError as exc:
        raise InputError(f"{exp.path}: {_label(exp)}evaluate.extra.{name}: {exc}") from None


def _label(exp: LoadedExperiment) -> str:
    return f"[{exp.group_name}] " if exp.group_name else ""


def monitor_for(task: Task, run: RunSpec) -> engine.Monitor | None:
    """The validation metric a run's early stopping watches (auto = the task's primary metric)."""
    stopping = run.train.early_stopping
    if stopping is None:
        return None
    metric = task.primary_metric if stopping.metric == "auto" else stopping.metric
    known = ["loss", *task.higher_is_better]
    if metric not in known:
        raise InputError(
            f"{run.name}: train.early_stopping.metric: '{metric}' is not a validation metric of this task"
            f"{did_you_mean(metric, known)}; expected one of: auto, {', '.join(known)}"
        )
    return engine.Monitor(metric, metric != "loss" and task.higher_is_better.get(metric, True))


def _check_monitors_are_measured(exp: LoadedExperiment, task: Task) -> None:
    """Early stopping on a metric needs it after every epoch, which only a task that scores its
    training rows gives (known once featurized): otherwise only the validation loss can be watched."""
    if task.scores_training_rows:
        return
    for run in exp.runs:
        monitor = monitor_for(task, run)
        if monitor is not None and monitor.metric != "loss":
            raise InputError(
                f"{exp.path}: {run.name}: train.early_stopping.metric: '{monitor.metric}' is not measured after "
                "each epoch for this task as set (its predictions need rows of their own, e.g. verbalizers of "
                "several tokens); expected: loss"
            )


Fresh = bool | list[str]  # --fresh: True = every run whose settings changed; names = exactly those runs
CHANGED = "was run with other settings"


def check_existing(prep: Prepared, fresh: Fresh, log: Log, runs: list[RunSpec] | None = None) -> None:
    """Before anything trains: a run folder written with other settings, or a finished run whose files
    are damaged, is an error unless --fresh moves it aside (to retrain it)."""
    conflicts = []
    for run in prep.exp.runs if runs is None else runs:
        folder = prep.store.run(run.name)
        why = _why_not_reusable(prep, run, folder)
        named = isinstance(fresh, list) and run.name in fresh
        if why is None and not named:
            continue
        if named or (fresh is True and why is not None and why.startswith(CHANGED)):
            if folder.path.exists():
                backup = folder.path.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                folder.path.rename(backup)
                log(f"[{run.name}] {why or 'asked for afresh'}: moved the old run to {backup.name}")
        else:
            conflicts.append(f"{folder.path}: {why}")
    if conflicts:
        raise InputError(
            "runs exist that cannot be reused as they are; nothing was trained. Give the experiment another "
            "name, pass --fresh to move runs with changed settings aside, or --fresh RUN... to retrain named runs:",
            problems=conflicts,
        )


def _why_not_reusable(prep: Prepared, run: RunSpec, folder: RunDir) -> str | None:
    """Why an existing run folder cannot be reused (CHANGED ... or 'damaged ...'); None when it can."""
    try:
        old = folder.config()
    except InputError as exc:
        return f"damaged ({exc})"
    new = run_config(prep, run) if old else {}
    if old and old.get("fingerprint") != new["fingerprint"]:
        return f"{CHANGED} ({', '.join(_changed_keys(old, new))})"
    damage = folder.damage()
    return None if damage is None else f"damaged ({damage}); retrain it with --fresh {run.name}"


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        if key == "fingerprint":
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


# --- running ---------------------------------------------------------------------------------


def run_experiment(
    exp: LoadedExperiment,
    *,
    fresh: Fresh = False,
    executor: str | None = None,
    workers: int = 1,
    wait: bool = False,
    log: Log = log_line,
) -> int:
    """Train and evaluate every run of the experiment, then write the report. Returns an exit code.

    `executor` (process | inline | ray) overrides the experiment file's `executor.name`. The
    experiment folder is locked for the whole run (store.ExperimentLock; `wait`: queue behind a holder).
    """
    if workers < 1:
        raise InputError(f"--workers: expected a number >= 1, got {workers}")
    kind = executor or exp.spec.executor.name
    if kind == "ray":
        require_ray()
    check_launch(kind, exp.spec.executor.nproc_per_run)
    new = next((p for p in [*reversed(exp.runs_dir.parents), exp.runs_dir] if not p.exists()), None)
    try:
        with ExperimentLock(exp.runs_dir, wait=wait, log=log):
            return _run_locked(exp, fresh, kind, workers, log)
    except InputError:
        if new is not None and [p.name for p in new.rglob("*") if p.is_file()] == [ExperimentLock.NAME]:
            shutil.rmtree(new)  # bad input: leave nothing behind, not even the folders made for the lock
        raise


def _run_locked(exp: LoadedExperiment, fresh: Fresh, kind: str, workers: int, log: Log) -> int:
    removed = remove_stale_temp_files(exp.runs_dir)
    if removed:
        log(f"removed {removed} temp file(s) an interrupted run left in {exp.runs_dir}")
    engine.set_threads()
    preps = [prepare(group, log) for group in exp.groups()]
    for prep in preps:
        check_existing(prep, fresh, log)
    if kind == "process" and exp.spec.executor.nproc_per_run == 1:
        prestart_workers()  # the fork server imports the libraries while the baselines are evaluated
    store = ExperimentDir(exp.runs_dir)
    store.path.mkdir(parents=True, exist_ok=True)
    write_yaml(store.path / "experiment.yaml", _resolved_experiment(exp, preps))
    write_json(store.path / "data.json", _data_summaries(exp, preps))
    if exp.spec.evaluate.baselines:
        for prep in preps:
            compute_baselines(prep, log)
    for prep in preps:
        forgetting_base(prep, log)
    check_outside_experts(exp)  # experts from other experiments: checked before anything trains
    failed = run_protocol(preps, lambda items: execute_runs(exp, items, kind, workers, log), fresh, log)
    failed += run_mixtures(exp, log)  # after the runs: a mixture's experts may be this experiment's runs
    from peftlab.report import build_report, terminal_summary

    paths = build_report(store.path)
    for line in terminal_summary(store.path).splitlines():
        log(line)
    log(f"report: {paths['html']} (also report.md, results.csv)")
    if failed:
        log(f"{len(failed)} run(s) failed: {', '.join(failed)} (errors in their status.json)")
        return EXIT_RUN_FAILED
    return EXIT_OK


def execute_runs(
    exp: LoadedExperiment, items: list[tuple[Prepared, RunSpec]], executor: str, workers: int, log: Log
) -> list[str]:
    """Train the runs (each with its group's preparation) that are not done yet; return the names that failed."""
    todo = [(prep, run) for prep, run in items if not is_done(prep, run, log)]
    pending = {run.name for _, run in todo}
    for prep, run in items:  # finished runs are scored on forgetting sets added since (no retraining)
        if run.stage != "sweep" and run.name not in pending:
            if prep.forgetting:
                forgetting.refresh(prep.forgetting, prep.store.run(run.name), forgetting_base(prep, log), log)
            if exp.spec.analysis is not None:  # and analysed when `analysis:` was added or changed since
                analyze_finished(prep.store.run(run.name).path, exp.spec.analysis, log)
    if executor == "inline":
        return [run.name for prep, run in todo if not execute_run(prep, run, log)]
    store = ExperimentDir(exp.runs_dir)
    runs = [run for _, run in todo]
    nproc = exp.spec.executor.nproc_per_run
    jobs = jobs_for(exp.path, exp.overrides, runs, [store.run(r.name) for r in runs], workers, nproc)
    if executor == "ray":
        return run_in_ray(jobs, exp.spec.executor, log)
    return run_in_processes(jobs, workers, log)


def is_done(prep: Prepared, run: RunSpec, log: Log) -> bool:
    """True (and said) when the run finished earlier with the same settings."""
    folder = prep.store.run(run.name)
    done = (
        folder.status().get("state") == DONE
        and folder.config().get("fingerprint") == (run_config(prep, run)["fingerprint"])
        and folder.damage(deep=False) is None
    )
    if done:
        log(f"[{run.name}] done already: skipped")
    return done


def data_summary(examples: DatasetDict, sources: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """Examples per split (and label counts where examples carry a single string label; per-source counts)."""
    from collections import Counter

    out = {}
    counts = source_counts(sources or {})
    for name, ds in examples.items():
        entry: dict[str, Any] = {"n": len(ds)}
        if "label" in ds.column_names and ds.features["label"].dtype == "string":
            entry["labels"] = dict(sorted(Counter(ds["label"]).items()))
        if name in counts:
            entry["sources"] = counts[name]
        out[name] = entry
    return out


def _data_summaries(exp: LoadedExperiment, preps: list[Prepared]) -> dict[str, Any]:
    """data.json: examples per split; in a multi-task experiment, per task key."""
    if not exp.parts:
        return data_summary(preps[0].examples, preps[0].sources)
    return {prep.exp.group["task"] or "data": data_summary(prep.examples, prep.sources) for prep in preps}


def _resolved_experiment(exp: LoadedExperiment, preps: list[Prepared]) -> dict[str, Any]:
    """The experiment as run, with each task's fitted state (e.g. its labels)."""
    data = exp.spec.model_dump(mode="json")
    for key in ("model", "models", "task", "data", "tasks"):  # the form not used is left out
        if data.get(key) is None:
            data.pop(key, None)
    states = {prep.exp.group.get("task", ""): {"name": prep.task_name, **prep.task.state()} for prep in preps}
    if "tasks" in data:
        for entry in data["tasks"]:
            entry["task"] = states.get(entry.get("key") or _task_name(entry["task"]), entry["task"])
    elif preps:
        data["task"] = next(iter(states.values()))
    return data


def _task_name(value: Any) -> str:
    return value if isinstance(value, str) else str(value.get("name"))


def _failure(exc: BaseException) -> str:
    """The error a failed run records; a write the disk refused says what to do about it."""
    import errno

    advice = {
        errno.ENOSPC: "the disk is full: free space, then run again",
        errno.EDQUOT: "the disk quota is used up: free space, then run again",
        errno.EFBIG: "a file grew past the size limit (ulimit -f): raise it, then run again",
        errno.EROFS: "the output folder is read-only: set output_dir to a writable folder",
        errno.EACCES: "no permission to write there: set output_dir to a writable folder",
    }
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:  # libraries with native writers (safetensors) say "... (os error 27)"
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code in advice:
        where = f" {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
        return (
            f"could not write{where} ({os.strerror(code)}): {advice[code]}; files written before are intact "
            f"[{type(exc).__name__}: {exc}]"
        )
    return f"{type(exc).__name__}: {exc}"


def execute_run(prep: Prepared, run: RunSpec, log: Log) -> bool:
    """Train, evaluate and save one run unless it is already done. False when it failed."""
    folder = prep.store.run(run.name)
    config = run_config(prep, run)
    if is_done(prep, run, log):
        return True
    folder.path.mkdir(parents=True, exist_ok=True)
    write_yaml(folder.config_file, config)
    folder.set_status(RUNNING, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    try:
        metrics, method, model = train_and_evaluate(prep, run, folder, log)
    except KeyboardInterrupt:
        folder.set_status(FAILED, error="interrupted (KeyboardInterrupt); run again to resume")
        raise
    except Exception as exc:
        message = _failure(exc)
        log(f"[{run.name}] FAILED: {message}")
        try:
            write_atomic(folder.path / "error.log", traceback.format_exc())
            folder.set_status(FAILED, error=message, traceback="error.log")
        except OSError as again:  # the disk that failed the run may refuse the status too
            log(f"[{run.name}] could not record the failure in {folder.status_file}: {_failure(again)}")
        return False
    faults.point("metrics")  # kill point: metrics written, the run not yet done
    folder.record_done(finished=time.strftime("%Y-%m-%dT%H:%M:%S"), train_seconds=metrics["train"]["train_seconds"])
    faults.point("done")
    if prep.exp.spec.analysis is not None and run.stage != "sweep":  # after `done`: a kill here costs no training
        try:
            analyze(analysis_subject(prep, run, method, model), prep.exp.spec.analysis, folder.path / "analysis", log)
        except Exception as exc:  # the run stands; the next `run` or `peftlab analyze` measures it again
            log(f"[{run.name}] analysis FAILED: {_failure(exc)}")
    return True


def build_run_model(prep: Prepared, run: RunSpec) -> tuple[Any, Any]:
    """The task model with the run's method applied (seeded, so the task head starts the same)."""
    from transformers import set_seed

    set_seed(run.train.seed)
    method = METHODS.get(run.method)(**run.settings)
    model = prep.task.build_model(prep.source, prep.tokenizer, **method.load_kwargs())
    model = method.apply(model, head_modules=prep.task.head_modules(model), task_type=prep.task.peft_task_type)
    return method, model


def train_and_evaluate(prep: Prepared, run: RunSpec, folder: RunDir, log: Log) -> tuple[dict[str, Any], Method, Any]:
    """Train, evaluate and save one run; its metrics (as written), its method and the trained model."""
    method, model = build_run_model(prep, run)
    trainable, total = count_parameters(model)
    precision = engine.resolve_precision(run.train.precision)
    log(
        f"[{run.name}] {run.method}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.3f}%), lr {run.train.lr:g}, {precision}"
    )
    collator = prep.task.collator(prep.tokenizer)
    train_examples, train_set = training_set(prep, run)
    result = engine.train(
        model,
        prep.task.model_inputs(train_set),
        prep.inputs("validation") if "validation" in prep.features else None,
        collator,
        run.train,
        folder,
        precision=precision,
        log=log,
        label=run.name,
        validation_metrics=validation_metrics(prep),
        monitor=monitor_for(prep.task, run),
        reduce=prep.task.reduce_outputs,
    )
    evaluation = evaluate_splits(prep, model, run, folder, precision, log)
    if run.save_model:
        shutil.rmtree(folder.adapter_dir, ignore_errors=True)  # what a killed attempt left
        method.save(model, folder.adapter_dir)
        prep.tokenizer.save_pretrained(folder.adapter_dir)
        follow_umask(folder.adapter_dir)  # safetensors writes its files private (0600)
        faults.point("adapter")
    forgot = forgetting.evaluate_run(
        prep.forgetting if run.stage != "sweep" else [],  # sweep points are scored on validation only
        model,
        forgetting_base(prep, log),
        prep.tokenizer,
        run.train,
        precision,
        folder.predictions_dir,
        log,
        run.name,
    )
    epochs = max(result.epochs_run, 1e-9)
    metrics = {
        "run": run.name,
        "method": run.method,
        "settings": method.resolve(prep.model_type),
        "task": task_summary(prep.task, prep.task_name),
        "params": {"trainable": trainable, "total": total, "trainable_pct": 100 * trainable / total},
        "train": {
            "train_seconds": result.train_seconds,
            "wall_seconds": result.wall_seconds,
            "seconds_per_epoch": round(result.train_seconds / epochs, 3),
            "epochs": result.epochs_run,
            "steps": result.steps,
            "samples_per_second": result.samples_per_second,
            "tokens_per_second": result.tokens_per_second,
            "tokens_seen": result.tokens_seen,
            "train_examples": train_examples,
            "train_sequences": len(train_set),  # more than examples when a task windows them
            "processes": result.processes,  # data-parallel (executor.nproc_per_run)
            "global_batch_size": run.train.batch_size * run.train.grad_accum * result.processes,
            "resumed_from": result.resumed_from,
            "max_epochs": run.train.epochs,
            **early_stopping_summary(prep, run, result),
        },
        "memory": {"peak_mib": result.peak_memory_mib, "kind": result.memory_kind},
        "eval": evaluation,
        **({"forgetting": forgot} if forgot else {}),
        "lr": run.train.lr,
        "precision": precision,
        "seed": run.train.seed,
        "hardware": engine.hardware(),
        "versions": engine.versions(),
    }
    write_json(folder.metrics_file, metrics)
    shutil.rmtree(folder.checkpoints_dir, ignore_errors=True)  # the adapter is saved; checkpoints are spent
    summary = ", ".join(
        f"{split} {prep.task.primary_metric} {m[prep.task.primary_metric]:.4f}" for split, m in evaluation.items()
    )
    log(f"[{run.name}] done in {result.train_seconds:.0f}s training: {summary}")
    return metrics, method, model


def analysis_subject(prep: Prepared, run: RunSpec, method: Method, model: Any) -> Subject:
    """The trained model, its base (quantized as the run's was) and the evaluated examples, for analysis."""
    data = prep.exp.spec.data
    assert data is not None and data.max_length is not None
    return Subject(
        run.name,
        run.method,
        method,
        model,
        lambda: base_model(prep, run.train.seed, **method.load_kwargs()),
        prep.model_type,
        prep.task,
        prep.tokenizer,
        data.max_length,
        {s: prep.examples[s] for s in prep.exp.spec.evaluate.all_splits()},
        run_config(prep, run)["fingerprint"],
        data.seed,
    )


def training_set(prep: Prepared, run: RunSpec) -> tuple[int, Dataset]:
    """The run's training examples (their number) and features: all, or for a sweep point a seeded
    sample of `data_fraction` of the examples, featurized (a task may cut an example into windows)."""
    examples = prep.examples["train"]
    if run.data_fraction >= 1:
        return len(examples), prep.features["train"]
    data = prep.exp.spec.data
    assert data is not None and data.max_length is not None
    count = max(1, math.ceil(run.data_fraction * len(examples)))
    return count, prep.task.featurize(sample(examples, count, data.seed), prep.tokenizer, data.max_length)


def task_summary(task: Task, name: str) -> dict[str, Any]:
    """What the report needs to know of the task: its name and which metrics lead its tables."""
    return {
        "name": name,
        "primary_metric": task.primary_metric,
        "higher_is_better": task.higher_is_better.get(task.primary_metric, True),
        "headline_metrics": list(task.headline_metrics or (task.primary_metric,)),
        "score_scale": task.score_scale,
    }


def validation_metrics(prep: Prepared) -> Any:
    """The task's scalar metrics on the validation split from raw model outputs (for each epoch)."""
    examples, features = prep.examples.get("validation"), prep.features.get("validation")
    if examples is None or features is None or not prep.task.scores_training_rows:
        return None

    def compute(outputs: Any) -> dict[str, float]:
        scores = prep.task.score(prep.task.predict(outputs, examples, features))
        return {
            k: float(v) for k, v in scores.items() if isinstance(v, int | float) and k in prep.task.higher_is_better
        }

    return compute


def early_stopping_summary(prep: Prepared, run: RunSpec, result: engine.TrainResult) -> dict[str, Any]:
    """What metrics.json records about early stopping (nothing when the run did not use it)."""
    monitor = monitor_for(prep.task, run)
    if monitor is None or run.train.early_stopping is None:
        return {}
    return {
        "early_stopping": {
            "metric": monitor.metric,
            "patience": run.train.early_stopping.patience,
            "stopped_early": result.stopped_early,
            "stopped_at_epoch": result.epochs_run,
            "best_epoch": result.best_epoch,
            "best_value": result.best_metric,
        }
    }


def evaluate_splits(
    prep: Prepared, model: Any, run: RunSpec, folder: RunDir, precision: str, log: Log
) -> dict[str, dict[str, Any]]:
    """Predict and score each evaluated split; predictions go to predictions/<split>.jsonl."""
    out = {}
    for split in run.eval_splits or prep.exp.spec.evaluate.all_splits():
        faults.point("eval")
        metrics, seconds = predict_and_score(
            prep, model, split, run.train, precision, folder.predictions_dir / f"{split}.jsonl"
        )
        out[split] = {**metrics, "eval_seconds": round(seconds, 3)}
    return out


def predict_and_score(
    prep: Prepared, model: Any, split: str, train: Any, precision: str, path: Any
) -> tuple[dict[str, Any], float]:
    """Predict one split, write the predictions to `path`, score them (per source too); seconds predicting."""
    features = prep.predict_features[split]
    outputs, seconds = prep.task.model_outputs(model, features, prep.tokenizer, train, precision)
    predictions = prep.task.predict(outputs, prep.examples[split], features)
    metrics = score_with_sources(prep.task.score, predictions, prep.sources.get(split))
    write_jsonl(path, predictions)
    return metrics, seconds


# --- baselines -------------------------------------------------------------------------------


def compute_baselines(prep: Prepared, log: Log) -> None:
    """Model-free baselines (e.g. majority class) and the untrained model, once per experiment."""
    spec = prep.exp.spec
    key = fingerprint(
        {
            "model": str(spec.model),
            "data": spec.data.model_dump(),
            "task": prep.task.state(),
            "splits": spec.evaluate.all_splits(),
            "seed": spec.train.seed,
        }
    )
    target = prep.store.baselines_for(prep.exp.group_name)
    from peftlab.store import read_json

    if (read_json(target) or {}).get("fingerprint") == key:
        return
    results: dict[str, dict[str, Any]] = {}
    for name, predict_fn in prep.task.baselines(prep.examples["train"]).items():
        results[name] = {
            split: score_with_sources(prep.task.score, predict_fn(prep.examples[split]), prep.sources.get(split))
            for split in spec.evaluate.all_splits()
        }
    log("baseline: evaluating the untrained model ...")
    train_spec = _first_train(prep)
    model = base_model(prep)
    precision = engine.resolve_precision(train_spec.precision)
    untrained = {}
    for split in spec.evaluate.all_splits():
        path = target.parent / "predictions" / f"untrained-{split}.jsonl"
        untrained[split], _ = predict_and_score(prep, model, split, train_spec, precision, path)
    results["untrained model"] = untrained
    faults.point("baselines")
    write_json(
        target,
        {
            "fingerprint": key,
            **{k: v for k, v in task_summary(prep.task, prep.task_name).items() if k != "name"},
            "baselines": results,
        },
    )


def _first_train(prep: Prepared) -> Any:
    """The training settings the baselines are evaluated with (batch size, precision): the first run's."""
    return prep.exp.runs[0].train if prep.exp.runs else prep.exp.spec.train


def base_model(prep: Prepared, seed: int | None = None, **load_kwargs: Any) -> Any:
    """The pretrained model as every run starts from it, before any method: the untrained baseline.

    `seed` (default: the experiment's) decides a random-weight model and the fresh head; `load_kwargs`
    load it as a method does (e.g. 4-bit for QLoRA, so an analysis compares like with like)."""
    from transformers import set_seed

    set_seed(prep.exp.spec.train.seed if seed is None else seed)
    return prep.task.build_model(prep.source, prep.tokenizer, **load_kwargs)


def forgetting_base(prep: Prepared, log: Log) -> dict[str, dict[str, Any]]:
    """The base model's scores on the forgetting sets (measured once, then read back)."""
    if not prep.forgetting:
        return {}
    return forgetting.ensure_base(
        prep.forgetting, prep.store.path, lambda: base_model(prep), prep.tokenizer, _first_train(prep), log
    )
