"""The report of a multi-model / multi-task experiment (`models:` and/or `tasks:`).

Laid out as the LoRA-multi study reports it (../shared/reference/seed-lora-multi-xlora-bert.txt):
  - a summary table with one row per model and method (with its trainable parameters) and one
    column group per task with that task's headline metrics (the study's Table 5);
  - every PEFT run's share of full fine-tuning's score and of its trainable parameters (the
    study's "90% of the performance with less than 1% of the parameters");
  - one training-time table per task: hardware, epochs run (and where early stopping stopped),
    training time and time per epoch (the study's Tables 2-4);
  - then, per task, the full results table, baselines and per-class scores of the single-task report.

A sweep in a multi-task experiment is not laid out as in the single-task report: each grid point
(and seed) is simply a row of its own (`lora-r8`), and sweep-then-train adds its sweep table.

Like the rest of the report it is built from the files on disk only. Which run is the reference
for a PEFT run: the run of the same model and task that trains every weight (trainable = total).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from peftlab.report import (
    damage_blocks,
    failure_blocks,
    figure_blocks,
    fmt_num,
    fmt_params,
    metric_columns,
    per_class_blocks,
    result_rows,
    results_blocks,
    settings_blocks,
    summary_hardware,
)
from peftlab.report.compare import comparison_blocks
from peftlab.report.inside import inside_blocks
from peftlab.report.mixture import mixture_blocks, mixture_terminal_lines
from peftlab.report.render import Block, Heading, Paragraph, Table, aligned_text, to_html, to_markdown
from peftlab.report.sweeps import selection_blocks
from peftlab.report.tradeoffs import tradeoff_blocks
from peftlab.store import DONE, ExperimentDir, RunDir, read_json, write_atomic


def is_multitask(experiment: dict[str, Any]) -> bool:
    return bool(experiment.get("tasks") or experiment.get("models"))


@dataclass
class TaskColumn:
    """One task of the experiment: its key, task name, data and the metrics its summary shows."""

    key: str
    name: str
    source: str
    headline: list[str] = field(default_factory=list)
    scale: float = 1.0  # a perfect score (100.0 when the task reports x100 itself, as QA does)


@dataclass
class Cell:
    """One (model, task, method) run as the tables need it."""

    run: RunDir
    model: str
    task: str
    method: str
    entry: str = ""  # the method entry (differs from `method` for the points of a sweep)

    @cached_property
    def metrics(self) -> dict[str, Any]:
        """metrics.json, read once: every table asks for it (a report is built from finished files)."""
        return self.run.metrics()

    @cached_property
    def done(self) -> bool:
        return self.run.status().get("state") == DONE and bool(self.metrics)

    def score(self, split: str, metric: str) -> float | None:
        value = self.metrics.get("eval", {}).get(split, {}).get(metric)
        return float(value) if isinstance(value, int | float) else None

    @property
    def trainable(self) -> int | None:
        return self.metrics.get("params", {}).get("trainable")

    @property
    def is_reference(self) -> bool:
        """Full fine-tuning: every weight trained."""
        params = self.metrics.get("params", {})
        return bool(params) and params.get("trainable") == params.get("total")


def build_multitask_report(exp_dir: ExperimentDir, experiment: dict[str, Any]) -> dict[str, Path]:
    runs = exp_dir.runs()
    models = list((experiment.get("models") or {"": experiment.get("model")}).keys())
    splits = list((experiment.get("evaluate") or {}).get("splits") or ["validation", "test"])
    split = splits[-1]
    cells = _cells(runs)
    tasks = _task_columns(experiment, cells, exp_dir, models)
    methods = _row_methods(experiment, cells)
    blocks: list[Block] = [Paragraph(line) for line in _summary_lines(exp_dir, experiment, tasks, runs)]
    blocks += summary_table_blocks(cells, tasks, models, methods, split, exp_dir)
    blocks += share_blocks(cells, tasks, split, exp_dir)
    blocks += mixture_blocks(exp_dir)  # mixtures of this experiment's LoRA experts, when it has any
    blocks += selection_blocks(exp_dir)  # sweep-then-train: its sweep table, when there was one
    blocks += time_blocks(cells, tasks, models, methods)
    blocks += early_stopping_blocks(runs)
    blocks += truncation_blocks(runs)
    for task in tasks:
        blocks += task_detail_blocks(exp_dir, cells, task, models, splits)
        blocks += comparison_blocks(exp_dir, [c.run for c in cells if c.task == task.key], {}, split, tag=task.key)
    for model in models:  # forgetting, the rank trade-off and the learning-vs-forgetting plane, per group
        for task in tasks:
            group = [c.run for c in cells if (c.model, c.task) == (model, task.key)]
            tag = group_name(model, task.key)
            blocks += tradeoff_blocks(exp_dir, group, _baselines(exp_dir, model, task.key), split, tag)
            blocks += inside_blocks(exp_dir, group, None, split, tag)  # primary: the runs' own
    blocks += settings_blocks(runs)
    blocks += figure_blocks(exp_dir, runs, {}, splits)
    blocks += failure_blocks(runs) + damage_blocks(exp_dir)
    title = f"peftlab report: {experiment.get('name', exp_dir.path.name)}"
    out = {"md": exp_dir.path / "report.md", "html": exp_dir.path / "report.html", "csv": exp_dir.path / "results.csv"}
    write_atomic(out["md"], to_markdown(title, blocks))
    write_atomic(out["html"], to_html(title, blocks, exp_dir.path))
    write_atomic(out["csv"], multitask_csv(exp_dir, cells, tasks, models, splits))
    return out


# --- collecting ------------------------------------------------------------------------------


def _cells(runs: list[RunDir]) -> list[Cell]:
    out = []
    for run in runs:
        group = run.config().get("group") or {}
        model, task, entry = group.get("model", ""), group.get("task", ""), group.get("method", run.name)
        prefix = group_name(model, task) + "."
        # a sweep point or seed of the entry is its own row under its own name (lora-r8, lora-seed1)
        method = run.name[len(prefix) :] if prefix != "." and run.name.startswith(prefix) else entry
        out.append(Cell(run, model, task, method, entry))
    return out


def _row_methods(experiment: dict[str, Any], cells: list[Cell]) -> list[str]:
    """The rows' methods: the method entries in the file's order, each followed by its sweep points."""
    out: list[str] = []
    for entry in experiment.get("methods") or {}:
        out += list(dict.fromkeys(c.method for c in cells if c.entry == entry)) or [entry]
    return out


def _task_columns(
    experiment: dict[str, Any], cells: list[Cell], exp_dir: ExperimentDir, models: list[str]
) -> list[TaskColumn]:
    entries = experiment.get("tasks") or [{"key": "", "task": experiment.get("task"), "data": experiment.get("data")}]
    out = []
    for entry in entries:
        task = entry.get("task") or {}
        name = task if isinstance(task, str) else str(task.get("name", ""))
        key = entry.get("key") or ("" if not experiment.get("tasks") else name)
        column = TaskColumn(key, name, str((entry.get("data") or {}).get("source", "")))
        column.headline, column.scale = _headline(cells, key, exp_dir, models)
        out.append(column)
    return out


def _headline(cells: list[Cell], task: str, exp_dir: ExperimentDir, models: list[str]) -> tuple[list[str], float]:
    """The task's headline metrics and score scale as its runs (or baselines) recorded them."""
    for cell in cells:
        summary = cell.metrics.get("task", {})
        if cell.task == task and summary.get("headline_metrics"):
            return list(summary["headline_metrics"]), float(summary.get("score_scale", 1.0))
    for model in models:
        base = read_json(exp_dir.baselines_for(group_name(model, task)), {}) or {}
        if base.get("headline_metrics") or base.get("primary_metric"):
            headline = list(base.get("headline_metrics") or [base["primary_metric"]])
            return headline, float(base.get("score_scale", 1.0))
    return [], 1.0


def group_name(model: str, task: str) -> str:
    return ".".join(v for v in (model, task) if v)


def _find(cells: list[Cell], model: str, task: str, method: str) -> Cell | None:
    return next((c for c in cells if (c.model, c.task, c.method) == (model, task, method)), None)


def _baselines(exp_dir: ExperimentDir, model: str, task: str) -> dict[str, Any]:
    return (read_json(exp_dir.baselines_for(group_name(model, task)), {}) or {}).get("baselines", {})


def _label(model: str, method: str) -> str:
    return f"{model} ({method})" if model else method


def _pct(value: float | None, scale: float = 1.0) -> str:
    """A score x100 (a fraction's scale is 1.0; a score already x100 has scale 100.0)."""
    return f"{100 * value / scale:.1f}" if isinstance(value, int | float) else "—"


# --- blocks ----------------------------------------------------------------------------------


def _summary_lines(
    exp_dir: ExperimentDir, experiment: dict[str, Any], tasks: list[TaskColumn], runs: list[RunDir]
) -> list[str]:
    from peftlab.report import _model_text

    lines = [experiment["description"]] if experiment.get("description") else []
    models = experiment.get("models") or {"model": experiment.get("model")}
    lines.append("Models: " + "; ".join(f"`{k}` = `{_model_text(v)}`" for k, v in models.items()) + ".")
    sizes = read_json(exp_dir.path / "data.json", {}) or {}
    for task in tasks:
        counts = sizes.get(task.key or "data", sizes) if experiment.get("tasks") else sizes
        shown = ", ".join(f"{k} {v['n']:,}" for k, v in counts.items() if isinstance(v, dict) and "n" in v)
        lines.append(
            f"Task `{task.key or task.name}`: `{task.name}` on `{task.source}`" + (f" ({shown})" if shown else "") + "."
        )
    lines += summary_hardware(exp_dir, runs)
    return lines


def summary_table_blocks(
    cells: list[Cell],
    tasks: list[TaskColumn],
    models: list[str],
    methods: list[str],
    split: str,
    exp_dir: ExperimentDir,
) -> list[Block]:
    """Rows: model and method with trainable parameters; columns: each task's headline metrics (x100)."""
    header = ["Model & method", "Trainable params"] + [f"{t.key or t.name} {m}" for t in tasks for m in t.headline]
    rows = []
    for model in models:
        for method in methods:
            found = [c for c in (_find(cells, model, t.key, method) for t in tasks) if c is not None]
            if not found:
                continue
            counts = list(dict.fromkeys(fmt_params(n) for n in sorted(c.trainable for c in found if c.trainable)))
            params = "–".join([counts[0], counts[-1]] if len(counts) > 1 else counts) or "—"
            scores = []
            for task in tasks:
                cell = _find(cells, model, task.key, method)
                scores += [_pct(cell.score(split, m), task.scale) if cell and cell.done else "—" for m in task.headline]
            rows.append([_label(model, method), params, *scores])
    rows += _baseline_summary_rows(exp_dir, tasks, models, split)
    caption = (
        f"Scores x100 on the {split} split; trainable parameters as PEFT counts them, task head included "
        "(a range when the heads of the tasks differ in size). Baselines below the runs: model-free ones "
        "fitted on train, and each model untrained."
    )
    return [Heading("Summary across tasks"), Table(header, rows, caption)]


def _baseline_summary_rows(exp_dir: ExperimentDir, tasks: list[TaskColumn], models: list[str], split: str) -> list:
    names: list[str] = []
    by_task: dict[str, dict[str, Any]] = {}
    for task in tasks:
        by_task[task.key] = _task_baselines(exp_dir, task.key, models)["baselines"]
        names += [n for n in by_task[task.key] if n not in names]
    rows = []
    for name in names:
        cells = [
            _pct((by_task[t.key].get(name) or {}).get(split, {}).get(m), t.scale) for t in tasks for m in t.headline
        ]
        rows.append([f"baseline: {name}", "—", *cells])
    return rows


def _no_better_than_baselines(
    exp_dir: ExperimentDir, reference: Cell, task: TaskColumn, metric: str, split: str
) -> str | None:
    """Why full fine-tuning's score is no real reference (None when it is one).

    A share of a reference that does not beat the task's best baseline says nothing about the PEFT
    method. "Beats" means by two standard errors of a proportion at the baseline's score on the
    split's n examples (the usual test for accuracy; for token- or entity-level scores, whose units
    outnumber the examples, a conservative approximation).
    """
    full, n = reference.score(split, metric), (reference.metrics.get("eval", {}).get(split) or {}).get("n")
    scored = {
        name: values[split][metric] / task.scale
        for name, values in _baselines(exp_dir, reference.model, task.key).items()
        if isinstance((values.get(split) or {}).get(metric), int | float)
    }
    if full is None or not n or not scored:
        return None
    name, best = max(scored.items(), key=lambda item: item[1])
    margin = 2 * math.sqrt(max(best * (1 - best), 0.0) / n)
    if full / task.scale > best + margin:
        return None
    return f"{_pct(full, task.scale)} against {name} {_pct(best)} (two standard errors: {100 * margin:.1f}, n={n})"


def share_blocks(cells: list[Cell], tasks: list[TaskColumn], split: str, exp_dir: ExperimentDir) -> list[Block]:
    """Each PEFT run's score and trainable parameters as a share of full fine-tuning's."""
    rows, verdicts, unfounded = [], [], {}
    for cell in cells:
        reference = next(
            (c for c in cells if (c.model, c.task) == (cell.model, cell.task) and c.is_reference and c.done), None
        )
        task = next((t for t in tasks if t.key == cell.task), None)
        if reference is None or cell is reference or not cell.done or cell.is_reference or task is None:
            continue
        param_share = cell.trainable / reference.trainable if cell.trainable and reference.trainable else None
        for metric in task.headline:
            mine, full = cell.score(split, metric), reference.score(split, metric)
            share = mine / full if mine is not None and full else None
            why = _no_better_than_baselines(exp_dir, reference, task, metric, split)
            if why:
                unfounded[(reference.model, task.key or task.name, metric)] = why
            rows.append(
                [
                    _label(cell.model, cell.method),
                    task.key or task.name,
                    metric,
                    _pct(mine, task.scale),
                    _pct(full, task.scale),
                    _pct(share) + (" †" if why else ""),
                    fmt_params(cell.trainable),
                    fmt_params(reference.trainable),
                    f"{100 * param_share:.2f}" if param_share is not None else "—",
                ]
            )
            if metric == task.headline[-1] and share is not None and param_share is not None and not why:
                verdicts.append(share >= 0.9 and param_share < 0.01)
    if not rows:
        return []
    header = [
        "Model & method",
        "Task",
        "Metric",
        "Score",
        "Full FT score",
        "% of full FT score",
        "Trainable",
        "Full FT trainable",
        "% of full FT params",
    ]
    caption = (
        f"{split} split. The reference is the run of the same model and task that trains every weight. "
        "The study's claim: about 90% of full fine-tuning's score with less than 1% of its parameters."
    )
    blocks: list[Block] = [Heading("PEFT against full fine-tuning"), Table(header, rows, caption)]
    if unfounded:
        blocks.append(
            Paragraph(
                "† Full fine-tuning does not beat the best baseline there, so the share says nothing and is "
                "left out of the count: "
                + "; ".join(
                    f"{model or 'model'} {task} {metric}: {why}" for (model, task, metric), why in unfounded.items()
                )
                + "."
            )
        )
    if not verdicts and unfounded:
        blocks.append(
            Paragraph("No full fine-tuning run here beats its baselines: the study's claim cannot be judged.")
        )
    if verdicts:
        blocks.append(
            Paragraph(
                f"{sum(verdicts)} of {len(verdicts)} PEFT run(s) reach at least 90% of full fine-tuning's "
                "score (each task's last headline metric) with less than 1% of its trainable parameters."
            )
        )
    return blocks


def _hardware(metrics: dict[str, Any]) -> str:
    hw = metrics.get("hardware") or {}
    if not hw:
        return "—"
    return hw.get("gpu") or f"CPU: {hw.get('cpu')} ({hw.get('cpu_threads')} threads)"


def _epochs(metrics: dict[str, Any]) -> str:
    train = metrics.get("train", {})
    epochs = train.get("epochs")
    text = fmt_num(epochs, 0) if isinstance(epochs, int | float) and float(epochs).is_integer() else fmt_num(epochs, 2)
    stop = train.get("early_stopping")
    if stop:
        best = stop.get("best_epoch")
        note = "stopped early" if stop.get("stopped_early") else "ran to the limit"
        text += f" of {train.get('max_epochs')} ({note}; best epoch {fmt_num(best, 0) if best else '—'})"
    return text


def time_blocks(cells: list[Cell], tasks: list[TaskColumn], models: list[str], methods: list[str]) -> list[Block]:
    """One table per task: hardware, epochs, training time and time per epoch (the study's Tables 2-4)."""
    blocks: list[Block] = []
    for task in tasks:
        rows = []
        for model in models:
            for method in methods:
                cell = _find(cells, model, task.key, method)
                if cell is None or not cell.done:
                    continue
                m = cell.metrics
                rows.append(
                    [
                        _label(model, method),
                        _hardware(m),
                        _epochs(m),
                        fmt_num(m.get("train", {}).get("train_seconds"), 2),
                        fmt_num(m.get("train", {}).get("seconds_per_epoch"), 2),
                    ]
                )
        if rows:
            header = ["Model & method", "Hardware", "Epochs", "Training time (s)", "Time per epoch (s)"]
            caption = f"Training time in seconds on `{task.key or task.name}`, evaluation excluded."
            blocks += [Heading(f"Training time: {task.key or task.name}", 3), Table(header, rows, caption)]
    return [Heading("Training time"), *blocks] if blocks else []


def truncation_blocks(runs: list[RunDir]) -> list[Block]:
    """Examples longer than max_length that were truncated (a repair, so it is counted and shown)."""
    notes = []
    for run in runs:
        for split, metrics in run.metrics().get("eval", {}).items():
            cut = metrics.get("n_truncated")
            if cut:
                notes.append(f"{run.name} [{split}]: {cut} of {metrics.get('n', '?')}")
    if not notes:
        return []
    return [
        Heading("Truncated examples"),
        Paragraph(
            "Examples longer than data.max_length were truncated (NER: the cut words are predicted 'O', "
            "so their entities count as missed): " + "; ".join(notes) + "."
        ),
    ]


def early_stopping_blocks(runs: list[RunDir]) -> list[Block]:
    """Where each run that used early stopping stopped, and its best epoch (both report forms)."""
    rows = []
    for run in runs:
        train = run.metrics().get("train", {})
        stop = train.get("early_stopping")
        if not stop:
            continue
        rows.append(
            [
                run.name,
                f"{stop.get('metric')} (patience {stop.get('patience')})",
                str(train.get("max_epochs", "—")),
                fmt_num(stop.get("stopped_at_epoch"), 0),
                "yes" if stop.get("stopped_early") else "no",
                fmt_num(stop.get("best_epoch"), 0) if stop.get("best_epoch") else "—",
                f"{stop['best_value']:.4f}" if isinstance(stop.get("best_value"), int | float) else "—",
            ]
        )
    if not rows:
        return []
    header = ["Run", "Validation metric", "Max epochs", "Stopped at epoch", "Early", "Best epoch", "Best value"]
    caption = "The weights of the best epoch are the ones evaluated and saved."
    return [Heading("Early stopping"), Table(header, rows, caption)]


def task_detail_blocks(
    exp_dir: ExperimentDir, cells: list[Cell], task: TaskColumn, models: list[str], splits: list[str]
) -> list[Block]:
    """The single-task report's results table (all metrics, baselines) and per-class scores for one task."""
    runs = [c.run for c in cells if c.task == task.key]
    baselines = _task_baselines(exp_dir, task.key, models)
    columns = metric_columns(runs, baselines, splits)
    rows = result_rows(runs, baselines, columns)
    primary = task.headline[-1] if task.headline else None
    blocks = results_blocks(rows, columns, primary, splits)
    blocks[0] = Heading(f"Task {task.key or task.name}: all results")
    per_class = per_class_blocks(runs, splits)
    if per_class:
        per_class[0] = Heading(f"Task {task.key or task.name}: {per_class[0].text.lower()}", 3)  # type: ignore[union-attr]
    return blocks + per_class


def _task_baselines(exp_dir: ExperimentDir, task: str, models: list[str]) -> dict[str, Any]:
    """Baselines of a task across models: model-free ones once, the untrained model per model."""
    merged: dict[str, Any] = {}
    for model in models:
        for name, scores in _baselines(exp_dir, model, task).items():
            merged.setdefault(f"untrained {model}".strip() if name == "untrained model" else name, scores)
    return {"baselines": merged}


def multitask_csv(
    exp_dir: ExperimentDir, cells: list[Cell], tasks: list[TaskColumn], models: list[str], splits: list[str]
) -> str:
    """results.csv: one row per run and per baseline, with its model and task keys."""
    fields = ["model", "task", "method", "run", "kind", "status"]
    fields += ["trainable_params", "total_params", "trainable_pct", "train_seconds", "seconds_per_epoch", "epochs"]
    fields += ["max_epochs", "stopped_early", "best_epoch", "samples_per_second", "tokens_per_second"]
    fields += ["peak_memory_mib", "lr", "seed"]
    body: list[dict[str, Any]] = []
    metric_fields: list[str] = []
    for task in tasks:
        runs = [c.run for c in cells if c.task == task.key]
        baselines = _task_baselines(exp_dir, task.key, models)
        columns = metric_columns(runs, baselines, splits)
        metric_fields += [f"{s}_{m}" for s, m in columns if f"{s}_{m}" not in metric_fields]
        by_name = {c.run.name: c for c in cells}
        for row in result_rows(runs, baselines, columns):
            cell = by_name.get(row["run"])
            stop = (cell.metrics.get("train", {}).get("early_stopping") or {}) if cell else {}
            row.update(
                {
                    "model": cell.model if cell else "",
                    "task": task.key,
                    "method": cell.method if cell else row["run"],
                    "max_epochs": cell.metrics.get("train", {}).get("max_epochs") if cell else None,
                    "stopped_early": stop.get("stopped_early"),
                    "best_epoch": stop.get("best_epoch"),
                }
            )
            body.append(row)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields + metric_fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in body:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields + metric_fields})
    return buffer.getvalue()


def multitask_terminal_summary(exp_dir: ExperimentDir, experiment: dict[str, Any]) -> str:
    """The summary table (model and method x task headline metrics) as aligned text."""
    models = list((experiment.get("models") or {"": None}).keys())
    splits = list((experiment.get("evaluate") or {}).get("splits") or ["validation", "test"])
    cells = _cells(exp_dir.runs())
    tasks = _task_columns(experiment, cells, exp_dir, models)
    table = summary_table_blocks(cells, tasks, models, _row_methods(experiment, cells), splits[-1], exp_dir)
    block = table[1]
    assert isinstance(block, Table)
    text = aligned_text(block.header, block.rows, left=1) + f"\n({splits[-1]} split, x100)"
    return "\n".join([text, *mixture_terminal_lines(exp_dir)])
