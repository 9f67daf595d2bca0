"""`peftlab report RUNS_DIR`: report.md, report.html and results.csv from whatever runs are on disk.

The report is rebuilt from files only (metrics.json, history.jsonl, status.json, baselines), so it
works on a half-finished experiment, after a crash, or on a copy of the runs folder elsewhere.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

from peftlab import faults
from peftlab.errors import InputError
from peftlab.report import plots
from peftlab.report.render import (
    Block,
    Figure,
    Figures,
    Heading,
    Paragraph,
    Table,
    aligned_text,
    to_html,
    to_markdown,
)
from peftlab.report.sweeps import sweep_blocks
from peftlab.store import DONE, ExperimentDir, RunDir, read_json, write_atomic

SKIP_METRICS = {"n", "eval_seconds", "n_truncated"}  # counts, shown in their own block


def build_report(path: Path | str) -> dict[str, Path]:
    """Write report.md, report.html and results.csv into the experiment folder; return their paths."""
    exp_dir = ExperimentDir(Path(path))
    if not (exp_dir.path / "experiment.yaml").exists():
        raise InputError(
            f"{path}: not an experiment folder (no experiment.yaml); "
            "expected runs/<experiment>/ as written by `peftlab run`"
        )
    from peftlab.report import compare, inside, multitask, tradeoffs

    experiment = exp_dir.experiment()
    if multitask.is_multitask(experiment):  # several models or tasks: the study's multi-task layout
        return multitask.build_multitask_report(exp_dir, experiment)
    runs = exp_dir.runs()
    baselines = read_json(exp_dir.baselines_file, {}) or {}
    evaluate = experiment.get("evaluate") or {}
    splits = list(evaluate.get("splits") or ["validation", "test"])  # in domain: the best run, confusion matrices
    scored = splits + list(evaluate.get("extra") or {})  # and the extra evaluation data by name
    columns = metric_columns(runs, baselines, scored)
    rows = result_rows(runs, baselines, columns)
    title = f"peftlab report: {experiment.get('name', exp_dir.path.name)}"
    blocks = summary_blocks(exp_dir, experiment, runs)
    blocks += results_blocks(rows, columns, baselines.get("primary_metric"), splits)
    blocks += compare.comparison_blocks(exp_dir, runs, baselines.get("baselines") or {}, splits[-1], _primary(runs))
    blocks += sweep_blocks(exp_dir, runs, scored, baselines.get("primary_metric") or _primary(runs))
    blocks += tradeoffs.tradeoff_blocks(exp_dir, runs, baselines.get("baselines") or {}, splits[-1])
    blocks += inside.inside_blocks(exp_dir, runs, baselines.get("primary_metric") or _primary(runs), splits[-1])
    blocks += multitask.early_stopping_blocks(runs) + multitask.truncation_blocks(runs)
    blocks += settings_blocks(runs)
    blocks += figure_blocks(exp_dir, runs, baselines, splits)
    last = evaluated(runs, baselines, splits[-1])
    blocks += share_blocks(exp_dir, last, splits[-1])
    blocks += source_blocks(exp_dir, last, splits[-1], baselines.get("primary_metric"))
    blocks += per_class_blocks(runs, splits)
    blocks += failure_blocks(runs) + damage_blocks(exp_dir)
    out = {"md": exp_dir.path / "report.md", "html": exp_dir.path / "report.html", "csv": exp_dir.path / "results.csv"}
    faults.point("report")
    write_atomic(out["md"], to_markdown(title, blocks))
    write_atomic(out["html"], to_html(title, blocks, exp_dir.path))
    write_atomic(out["csv"], results_csv(rows, columns))
    return out


def terminal_summary(path: Path | str) -> str:
    """A compact results table for the terminal: run, method, trainable %, train time, primary metric."""
    exp_dir = ExperimentDir(Path(path))
    from peftlab.report import multitask

    if multitask.is_multitask(exp_dir.experiment()):
        return multitask.multitask_terminal_summary(exp_dir, exp_dir.experiment())
    baselines = read_json(exp_dir.baselines_file, {}) or {}
    evaluate = exp_dir.experiment().get("evaluate") or {}
    splits = list(evaluate.get("splits") or ["validation", "test"]) + list(evaluate.get("extra") or {})
    runs = exp_dir.runs()
    primary = baselines.get("primary_metric") or next(iter(metric_columns(runs, baselines, splits)), ("", ""))[1]
    columns = [(split, primary) for split in splits]
    header = ["run", "method", "trainable %", "train time"] + [f"{s} {m}" for s, m in columns]
    body = [
        [
            row["run"] + ("" if row["status"] == DONE else f" ({row['status']})"),
            row["method"],
            fmt_num(row.get("trainable_pct"), 3),
            fmt_seconds(row.get("train_seconds")),
        ]
        + [fmt_metric(row.get(f"{s}_{m}")) for s, m in columns]
        for row in result_rows(runs, baselines, columns)
    ]
    return aligned_text(header, body, left=2)


# --- collecting ------------------------------------------------------------------------------


def _primary(runs: list[RunDir]) -> str | None:
    """The task's primary metric when there are no baselines to say it (evaluate.baselines: false)."""
    from peftlab.tasks import TASKS

    for run in runs:
        name = (run.config().get("task") or {}).get("name")
        if name in TASKS:
            return str(TASKS.get(name).primary_metric)
    return None


def scalar_metrics(metrics: dict[str, Any]) -> list[str]:
    return [
        k
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k not in SKIP_METRICS
    ]


def metric_columns(runs: list[RunDir], baselines: dict[str, Any], splits: list[str]) -> list[tuple[str, str]]:
    """(split, metric) pairs in a stable order: the first finished run's metrics, split by split."""
    names: list[str] = []
    sources = [r.metrics().get("eval", {}) for r in runs] + list(baselines.get("baselines", {}).values())
    for split in splits:
        for source in sources:
            for metric in scalar_metrics(source.get(split, {})):
                if metric not in names:
                    names.append(metric)
    return [(split, metric) for split in splits for metric in names]


def result_rows(runs: list[RunDir], baselines: dict[str, Any], columns: list[tuple[str, str]]) -> list[dict]:
    """One dict per run and per baseline with everything the table and the CSV show."""
    rows = []
    for run in runs:
        m = run.metrics()
        status = run.status().get("state", "pending")
        config = run.config()
        meta = config.get("sweep") or {}
        row = {"run": run.name, "kind": "run", "status": status, "method": config.get("method", "")}
        row.update({"base": meta.get("base", run.name), "point": json.dumps(meta.get("point") or {})})
        if m:
            train, params = m.get("train", {}), m.get("params", {})
            row.update(
                {
                    "trainable_params": params.get("trainable"),
                    "total_params": params.get("total"),
                    "trainable_pct": params.get("trainable_pct"),
                    "train_seconds": train.get("train_seconds"),
                    "seconds_per_epoch": train.get("seconds_per_epoch"),
                    "epochs": train.get("epochs"),
                    "samples_per_second": train.get("samples_per_second"),
                    "tokens_per_second": train.get("tokens_per_second"),
                    "peak_memory_mib": m.get("memory", {}).get("peak_mib"),
                    "memory_kind": m.get("memory", {}).get("kind"),
                    "precision": m.get("precision"),
                    "lr": m.get("lr"),
                    "seed": m.get("seed"),
                }
            )
            for split, metric in columns:
                row[f"{split}_{metric}"] = m.get("eval", {}).get(split, {}).get(metric)
        rows.append(row)
    for name, by_split in baselines.get("baselines", {}).items():
        row = {"run": name, "kind": "baseline", "status": DONE, "method": "baseline"}
        for split, metric in columns:
            row[f"{split}_{metric}"] = by_split.get(split, {}).get(metric)
        rows.append(row)
    return rows


# --- formatting ------------------------------------------------------------------------------


def fmt_int(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, int | float) else "—"


def fmt_num(value: Any, digits: int = 1) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, int | float) else "—"


def fmt_params(value: Any) -> str:
    """Parameter counts as the study writes them: 67M, 0.15M, 9.2K."""
    if not isinstance(value, int | float):
        return "—"
    if value >= 1e7:
        return f"{value / 1e6:.0f}M"
    if value >= 1e5:
        return f"{value / 1e6:.2f}M"
    return f"{value / 1e3:.1f}K"


def fmt_metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "—"


def fmt_seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return "—"
    return f"{value:.1f} s" if value < 120 else f"{int(value // 60)} min {int(value % 60):02d} s"


# --- blocks ----------------------------------------------------------------------------------


def _model_text(model: Any) -> str:
    if isinstance(model, dict):
        return ", ".join(f"{k}={v}" for k, v in model.items() if v not in (None, {}, []))
    return str(model)


def summary_blocks(exp_dir: ExperimentDir, experiment: dict[str, Any], runs: list[RunDir]) -> list[Block]:
    data = experiment.get("data", {})
    task = experiment.get("task", {})
    model = experiment.get("model")
    origin = " + ".join(str(s.get("name") or s.get("source")) for s in data.get("sources") or []) or data.get("source")
    lines = [
        f"Model: `{_model_text(model)}`. Task: `{task.get('name')}`. "
        f"Data: `{origin}`" + (f" (max length {data.get('max_length')})" if data else "") + ".",
    ]
    if experiment.get("description"):
        lines.insert(0, experiment["description"])
    sizes = read_json(exp_dir.path / "data.json")
    if sizes:
        lines.append("Examples per split: " + ", ".join(f"{k} {v['n']:,}" for k, v in sizes.items()) + ".")
    lines += summary_hardware(exp_dir, runs)
    return [Paragraph(line) for line in lines]


def summary_hardware(exp_dir: ExperimentDir, runs: list[RunDir]) -> list[str]:
    """The hardware and library versions of the first finished run, and when the report was made."""
    lines = []
    first = next((r.metrics() for r in runs if r.metrics()), {})
    hw = first.get("hardware")
    if hw:
        device = hw.get("gpu") or f"{hw.get('cpu')} ({hw.get('cpu_threads')} threads)"
        lines.append(
            f"Hardware: {hw.get('device')} — {device}. Versions: "
            + ", ".join(f"{k} {v}" for k, v in first.get("versions", {}).items())
            + "."
        )
    lines.append(f"Generated {time.strftime('%Y-%m-%d %H:%M')}; {len(runs)} run(s) found in `{exp_dir.path}`.")
    return lines


def results_blocks(
    rows: list[dict], columns: list[tuple[str, str]], primary: str | None, splits: list[str]
) -> list[Block]:
    header = [
        "Run",
        "Method",
        "Trainable params",
        "% of total",
        "Train time",
        "Time / epoch",
        "Samples/s",
        "Tokens/s",
        "Peak memory (MiB)",
    ] + [f"{split} {metric}" for split, metric in columns]
    table_rows = []
    for row in rows:
        name = row["run"] + (f" ({row['status']})" if row["status"] != DONE else "")
        cells = [
            name,
            row["method"],
            fmt_int(row.get("trainable_params")),
            fmt_num(row.get("trainable_pct"), 3),
            fmt_seconds(row.get("train_seconds")),
            fmt_seconds(row.get("seconds_per_epoch")),
            fmt_num(row.get("samples_per_second")),
            fmt_num(row.get("tokens_per_second"), 0),
            fmt_num(row.get("peak_memory_mib"), 0),
        ]
        table_rows.append(cells + [fmt_metric(row.get(f"{s}_{m}")) for s, m in columns])
    best = _best_row(rows, f"{splits[-1]}_{primary}") if primary else None
    caption = (
        "Trained runs, then baselines. Times are training only (evaluation excluded); tokens/s counts "
        "real (non-padding) tokens; peak memory is " + _memory_kind(rows) + f". Bold: best {splits[-1]} {primary}."
    )
    return [Heading("Results"), Table(header, table_rows, caption, {best} if best is not None else set())]


def _memory_kind(rows: list[dict]) -> str:
    kinds = {r.get("memory_kind") for r in rows if r.get("memory_kind")}
    return {
        "cuda_max_allocated": "the GPU allocator's peak",
        "cpu_peak_rss": "the process's peak resident memory during training",
    }.get(next(iter(kinds), ""), "as measured")


def _best_row(rows: list[dict], key: str) -> int | None:
    scored = [(r[key], i) for i, r in enumerate(rows) if r["kind"] == "run" and isinstance(r.get(key), float)]
    return max(scored)[1] if scored else None


def settings_blocks(runs: list[RunDir]) -> list[Block]:
    rows = []
    for run in runs:
        cfg = run.config()
        train = cfg.get("train", {})
        settings = ", ".join(f"{k}={v}" for k, v in (cfg.get("settings") or {}).items() if v not in (None, [], {}))
        rows.append(
            [
                run.name,
                cfg.get("method", ""),
                f"{train.get('lr', '')}",
                str(train.get("epochs", "")),
                str(train.get("batch_size", "")),
                str(run.metrics().get("precision", train.get("precision", ""))),
                str(train.get("seed", "")),
                settings or "—",
            ]
        )
    if not rows:
        return []
    header = ["Run", "Method", "Learning rate", "Epochs", "Batch", "Precision", "Seed", "Method settings"]
    return [Heading("Settings"), Table(header, rows)]


def figure_blocks(
    exp_dir: ExperimentDir, runs: list[RunDir], baselines: dict[str, Any], splits: list[str]
) -> list[Block]:
    figures_dir = exp_dir.path / "figures"
    curves = []
    for run in runs:
        title = f"{run.name}: training and validation loss"
        path = plots.learning_curve(run.history(), title, figures_dir / f"curve-{run.name}.png")
        if path:
            curves.append(Figure(path.relative_to(exp_dir.path), title))
    split = splits[-1]
    matrices = []
    sources = [(r.name, r.metrics().get("eval", {}).get(split, {})) for r in runs]
    sources += [
        (name, by_split.get(split, {}))
        for name, by_split in baselines.get("baselines", {}).items()
        if name == "untrained model"
    ]
    for name, metrics in sources:
        cm = metrics.get("confusion_matrix")
        if cm:
            slug = name.replace(" ", "-")
            path = plots.confusion(
                cm["matrix"], cm["labels"], f"{name} ({split})", figures_dir / f"confusion-{slug}-{split}.png"
            )
            matrices.append(Figure(path.relative_to(exp_dir.path), f"{name}: confusion matrix on {split}"))
    blocks: list[Block] = []
    if curves:
        blocks += [Heading("Learning curves"), Figures(curves)]
    if matrices:
        blocks += [Heading(f"Confusion matrices ({split})"), Figures(matrices)]
    return blocks


def evaluated(runs: list[RunDir], baselines: dict[str, Any], split: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, metrics on `split`) for every finished run, then every baseline."""
    found = [(r.name, r.metrics().get("eval", {}).get(split, {})) for r in runs]
    found += [(name, by_split.get(split, {})) for name, by_split in baselines.get("baselines", {}).items()]
    return [(name, metrics) for name, metrics in found if metrics]


def bias_line(name: str, predicted: dict[str, float], true: dict[str, float]) -> str:
    """One run's predicted share per label against the true share, and the most over-predicted label."""
    shares = ", ".join(
        f"{label} {100 * predicted[label]:.1f}% (true {100 * true.get(label, 0):.1f}%)" for label in predicted
    )
    label, excess = max(((k, predicted[k] - true.get(k, 0)) for k in predicted), key=lambda kv: kv[1])
    verdict = f"over-predicts {label} by {100 * excess:.1f} points" if excess > 0 else "matches the true shares"
    return f"{name}: predicts {shares}; {verdict}."


def share_blocks(exp_dir: ExperimentDir, results: list[tuple[str, dict[str, Any]]], split: str) -> list[Block]:
    """Predicted-label distribution per run and baseline against the true one (a bias check).

    Shown for any task whose metrics include `predicted_share` and `true_share`.
    """
    results = [(n, m) for n, m in results if m.get("predicted_share") and m.get("true_share")]
    if not results:
        return []
    true = results[0][1]["true_share"]
    labels = list(true)
    header = ["Run", *[f"{label} predicted" for label in labels], f"largest excess ({split})"]
    rows = [["true share", *[f"{100 * true[label]:.1f}%" for label in labels], "—"]]
    for name, metrics in results:
        predicted = metrics["predicted_share"]
        label, excess = max(((k, predicted.get(k, 0) - true.get(k, 0)) for k in labels), key=lambda kv: kv[1])
        rows.append(
            [name, *[f"{100 * predicted.get(k, 0):.1f}%" for k in labels], f"{label} {100 * excess:+.1f} points"]
        )
    figure = plots.label_shares(
        true,
        {name: m["predicted_share"] for name, m in results},
        f"predicted vs true label share ({split})",
        exp_dir.path / "figures" / f"label-shares-{split}.png",
    )
    return [
        Heading(f"Predicted vs true label share ({split})"),
        Table(header, rows, "Share of predictions per label; the first row is the share of each label in the data."),
        *[Paragraph(bias_line(name, m["predicted_share"], m["true_share"])) for name, m in results],
        Figure(figure.relative_to(exp_dir.path), "predicted label shares against the true shares"),
    ]


def source_blocks(
    exp_dir: ExperimentDir, results: list[tuple[str, dict[str, Any]]], split: str, primary: str | None
) -> list[Block]:
    """Per-source examples and metrics when the data merges several sources (`by_source` metrics)."""
    results = [(n, m["by_source"]) for n, m in results if m.get("by_source")]
    if not results or not primary:
        return []
    sources = list(results[0][1])
    blocks: list[Block] = [Heading(f"Per-source results ({split})")]
    sizes = read_json(exp_dir.path / "data.json") or {}
    counted = {split_name: v["sources"] for split_name, v in sizes.items() if v.get("sources")}
    if counted:
        header = ["Split", *sources]
        rows = [[name, *[fmt_int(c.get(s)) for s in sources]] for name, c in counted.items()]
        blocks.append(Table(header, rows, "Examples per source and split."))
    header = ["Run", *[f"{s} {primary}" for s in sources], *[f"{s} macro_f1" for s in sources]]
    rows = [
        [
            name,
            *[fmt_metric(by.get(s, {}).get(primary)) for s in sources],
            *[fmt_metric(by.get(s, {}).get("macro_f1")) for s in sources],
        ]
        for name, by in results
    ]
    blocks.append(Table(header, rows, f"Each source's {split} examples scored on their own: a fairness slice."))
    return blocks


def per_class_blocks(runs: list[RunDir], splits: list[str]) -> list[Block]:
    split = splits[-1]
    per_run = {r.name: r.metrics().get("eval", {}).get(split, {}).get("per_class") for r in runs}
    per_run = {k: v for k, v in per_run.items() if v}
    if not per_run:
        return []
    labels = list(next(iter(per_run.values())))
    rows = [[name] + [fmt_metric(pc.get(label, {}).get("f1")) for label in labels] for name, pc in per_run.items()]
    return [Heading(f"Per-class F1 ({split})"), Table(["Run", *labels], rows)]


def failure_blocks(runs: list[RunDir]) -> list[Block]:
    failed = [(r.name, r.status().get("error", "")) for r in runs if r.status().get("state") == "failed"]
    if not failed:
        return []
    return [Heading("Failed runs")] + [Paragraph(f"{name}: {error} (see {name}/error.log)") for name, error in failed]


def damage_blocks(exp_dir: ExperimentDir) -> list[Block]:
    """Finished runs whose files were damaged since: left out of every table, said here."""
    damaged = exp_dir.damaged()
    if not damaged:
        return []
    name = exp_dir.path.name
    return [Heading("Damaged runs")] + [
        Paragraph(
            f"{run}: damaged ({problem}); left out of this report. Retrain it: peftlab run <{name}.yaml> --fresh {run}"
        )
        for run, problem in damaged.items()
    ]


def results_csv(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    fields = [
        "run",
        "kind",
        "status",
        "method",
        "base",
        "point",
        "trainable_params",
        "total_params",
        "trainable_pct",
        "train_seconds",
        "seconds_per_epoch",
        "epochs",
        "samples_per_second",
        "tokens_per_second",
        "peak_memory_mib",
        "memory_kind",
        "precision",
        "lr",
        "seed",
    ] + [f"{s}_{m}" for s, m in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return buffer.getvalue()
