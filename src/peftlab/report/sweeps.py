"""Report blocks for sweeps and seeds, rebuilt from the run folders like the rest of the report.

- The sweep-then-train table (the LoRA-vs-(IA)3 study's Table 1): per method entry, each point's
  last-epoch training and validation loss (mean ± std over seeds), the chosen point marked, and a
  figure of the selection metric against the swept value.
- A grid sweep over one numeric setting (the rank study): the metric against the setting for every
  evaluated split (in domain and the extra evaluation data), trainable parameters against the
  metric, and the runs outside the sweep (e.g. full fine-tuning) as reference lines.
- Seeds: mean ± std per run group, and the single seeds as dots beside the mean.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.report import plots
from peftlab.report.render import Block, Figure, Figures, Heading, Paragraph, Table
from peftlab.store import DONE, ExperimentDir, RunDir, read_json
from peftlab.sweep import PLAN_FILE, SWEEP_DIR, PointResult, mean, point_key, point_label, selected_results, std


@dataclass
class Group:
    """The runs of one method entry at one grid point (one per seed)."""

    base: str
    point: dict[str, Any]
    runs: list[RunDir] = field(default_factory=list)
    _done: list[RunDir] | None = field(default=None, repr=False, compare=False)

    def done(self) -> list[RunDir]:
        """The finished runs (read once: a report is built from files that do not change meanwhile)."""
        if self._done is None:
            self._done = [r for r in self.runs if r.status().get("state") == DONE and r.metrics()]
        return self._done

    def values(self, split: str, metric: str) -> list[float]:
        found = [r.metrics().get("eval", {}).get(split, {}).get(metric) for r in self.done()]
        return [float(v) for v in found if isinstance(v, int | float)]

    def trainable(self) -> int | None:
        counts = [r.metrics().get("params", {}).get("trainable") for r in self.done()]
        return next((c for c in counts if isinstance(c, int)), None)


def fmt_mean_std(values: list[float], digits: int = 4) -> str:
    """ "0.7123" for one value, "0.7123 ± 0.0040" (sample std) for several, "—" for none."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{mean(values):.{digits}f} ± {std(values):.{digits}f}"


def groups_of(runs: list[RunDir]) -> list[Group]:
    """Top-level runs grouped by (method entry, grid point), in report order."""
    found: dict[tuple[str, str], Group] = {}
    for run in runs:
        meta = run.config().get("sweep") or {}
        base, point = meta.get("base", run.name), meta.get("point") or {}
        found.setdefault((base, point_key(point)), Group(base, point)).runs.append(run)
    return list(found.values())


def sweep_blocks(exp_dir: ExperimentDir, runs: list[RunDir], splits: list[str], primary: str | None) -> list[Block]:
    """Every sweep and seed block that applies to this experiment folder."""
    groups = groups_of(runs)
    blocks = selection_blocks(exp_dir)
    if primary:
        blocks += axis_blocks(exp_dir, groups, splits, primary)
        blocks += seed_blocks(exp_dir, groups, splits, primary)
    return blocks


# --- sweep-then-train ------------------------------------------------------------------------


def selection_blocks(exp_dir: ExperimentDir) -> list[Block]:
    record = read_json(exp_dir.path / SWEEP_DIR / PLAN_FILE)
    if not record:
        return []
    chosen = selected_results(exp_dir, record)
    metric, direction = record["metric"], record["direction"]
    seeds = any(len(p.runs) > 1 for results, _ in chosen.values() for p in results)
    header = ["Method", "Point", *(["Seeds"] if seeds else []), "Train loss", "Validation loss"]
    header += [f"Validation {metric}"] * (metric != "loss") + ["Chosen"]
    rows, bold, notes = [], set(), []
    for base, (results, best) in chosen.items():
        for i, result in enumerate(results):
            state = _state_text(result)
            row = [base if i == 0 else "", point_label(result.point) + state]
            row += [str(len(result.runs))] * seeds
            row += [fmt_mean_std(result.train_loss), fmt_mean_std(result.val_loss)]
            row += [fmt_mean_std(result.value)] * (metric != "loss") + ["✓" if i == best else ""]
            if i == best:
                bold.add(len(rows))
            rows.append(row)
        notes += _edge_note(base, results, best)
    examples = _sweep_examples(exp_dir, record)
    caption = (
        f"Each point trained {record['epochs']} epoch(s) on {record['fraction']:.0%} of the training data"
        + (f" ({examples})" if examples else "")
        + f"; losses at the end of the sweep. Chosen: the {'lowest' if direction == 'min' else 'highest'} "
        f"validation {metric} per method (mean over seeds), then trained in full (Results)."
    )
    blocks: list[Block] = [Heading("Sweep (sweep-then-train)"), Table(header, rows, caption, bold)]
    blocks += [Paragraph(note) for note in notes + _failures(exp_dir, record)]
    figure = _selection_figure(exp_dir, chosen, metric)
    return blocks + ([figure] if figure else [])


def _failures(exp_dir: ExperimentDir, record: dict[str, Any]) -> list[str]:
    names = [name for points in record.get("bases", {}).values() for p in points for name in p["runs"]]
    failed = [(name, exp_dir.run(name).status()) for name in names]
    return [
        f"{name} failed: {s.get('error', '')} (see {name}/error.log)"
        for name, s in failed
        if s.get("state") == "failed"
    ]


def _state_text(result: PointResult) -> str:
    states = [s for s in result.states if s != DONE]
    return f" ({', '.join(sorted(set(states)))})" if states else ""


def _sweep_examples(exp_dir: ExperimentDir, record: dict[str, Any]) -> str:
    """ "24 examples"; per method entry where they differ (the tasks of a multi-task experiment)."""
    counts = {}
    for base, points in record.get("bases", {}).items():
        found = (exp_dir.run(n).metrics().get("train", {}).get("train_examples") for p in points for n in p["runs"])
        count = next((int(c) for c in found if c), None)
        if count:
            counts[base] = count
    if len(set(counts.values())) == 1:
        return f"{next(iter(counts.values())):,} examples"
    return ", ".join(f"{base} {count:,}" for base, count in counts.items()) + " examples" if counts else ""


def _single_numeric_axis(points: list[dict[str, Any]]) -> str | None:
    """The one setting that varies across the points, when its values are numbers."""
    varying = [k for k in dict.fromkeys(k for p in points for k in p) if len({str(p.get(k)) for p in points}) > 1]
    if len(varying) != 1:
        return None
    values = [p.get(varying[0]) for p in points]
    return varying[0] if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values) else None


def _edge_note(base: str, results: list[PointResult], best: int | None) -> list[str]:
    """A choice at the end of a one-setting grid may mean the best value lies outside it."""
    axis = _single_numeric_axis([r.point for r in results])
    if best is None or axis is None or len(results) < 3:
        return []
    values = [r.point[axis] for r in results]
    value = values[best]
    if value not in (min(values), max(values)):
        return []
    side = "largest" if value == max(values) else "smallest"
    name = axis.split(".")[-1]
    return [
        f"{base}: the chosen {name} {value:g} is the {side} in the grid; the best may lie beyond it (widen the grid)."
    ]


def _selection_figure(
    exp_dir: ExperimentDir, chosen: dict[str, tuple[list[PointResult], int | None]], metric: str
) -> Figure | None:
    import matplotlib.pyplot as plt

    series = []
    for base, (results, best) in chosen.items():
        axis = _single_numeric_axis([r.point for r in results])
        if axis is None:
            continue
        done = [(r.point[axis], r.value, i == best) for i, r in enumerate(results) if r.done]
        if done:
            series.append((base, axis, done))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 3.6), dpi=110)
    for base, axis, done in series:
        xs = [d[0] for d in done]
        line = ax.errorbar(xs, [mean(d[1]) for d in done], yerr=[std(d[1]) for d in done], fmt="o-", capsize=3)
        ax.plot([d[0] for d in done if d[2]], [mean(d[1]) for d in done if d[2]], "*", ms=15, color=line[0].get_color())
        line.set_label(f"{base} ({axis.split('.')[-1]})")
    _log_x(ax, [x for _, _, done in series for x in (d[0] for d in done)])
    ax.set_xlabel(", ".join(dict.fromkeys(axis for _, axis, _ in series)))
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("Sweep: validation " + metric + " (star: chosen)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = plots._save(fig, exp_dir.path / "figures" / "sweep-selection.png")
    return Figure(path.relative_to(exp_dir.path), f"Sweep: validation {metric} per point; the star marks the choice")


def _log_x(ax: Any, xs: list[float]) -> None:
    positive = [x for x in xs if x > 0]
    if positive and len(positive) == len(xs) and max(positive) / min(positive) >= 8:
        integers = all(float(x).is_integer() for x in positive)
        ax.set_xscale("log", base=2 if integers else 10)
        if integers:  # label the grid's own values (1, 4, 16), not powers of two
            ticks = sorted(set(positive))
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()


# --- grid sweeps over one setting (e.g. LoRA rank) -------------------------------------------


def axis_blocks(exp_dir: ExperimentDir, groups: list[Group], splits: list[str], metric: str) -> list[Block]:
    by_base: dict[str, list[Group]] = defaultdict(list)
    for group in groups:
        by_base[group.base].append(group)
    references = [g for g in groups if not g.point and g.done()]
    blocks: list[Block] = []
    for base, members in by_base.items():
        swept = [g for g in members if g.point]
        axis = _single_numeric_axis([g.point for g in swept]) if len(swept) > 1 else None
        if axis is None:
            continue
        swept.sort(key=lambda g: g.point[axis])
        name = axis.split(".")[-1]
        header = [name, "Trainable params", *(f"{s} {metric}" for s in splits)]
        rows = [[f"{g.point[axis]:g}", *_cells(g, splits, metric)] for g in swept]
        rows += [[f"{r.base} (reference)", *_cells(r, splits, metric)] for r in references]
        caption = f"{base}: {metric} for each {name} on every evaluated split (mean ± std over seeds where several)."
        figures = [
            _axis_figure(exp_dir, base, axis, swept, references, splits, metric),
            _params_figure(exp_dir, base, swept, references, splits, metric),
        ]
        blocks += [Heading(f"Sweep over {name} ({base})"), Table(header, rows, caption), Figures(figures)]
    return blocks


def _cells(group: Group, splits: list[str], metric: str) -> list[str]:
    count = group.trainable()
    return [f"{count:,}" if count is not None else "—", *(fmt_mean_std(group.values(s, metric)) for s in splits)]


def _axis_figure(
    exp_dir: ExperimentDir,
    base: str,
    axis: str,
    swept: list[Group],
    references: list[Group],
    splits: list[str],
    metric: str,
) -> Figure:
    import matplotlib.pyplot as plt

    name = axis.split(".")[-1]
    fig, ax = plt.subplots(figsize=(5.8, 3.8), dpi=110)
    xs = [g.point[axis] for g in swept]
    for i, split in enumerate(splits):
        color = f"C{i}"
        _spread(ax, xs, [g.values(split, metric) for g in swept], color, f"{base} {split}")
        for j, ref in enumerate(references):
            values = ref.values(split, metric)
            if values:
                ax.axhline(mean(values), color=color, ls=("--", ":", "-.")[j % 3], lw=1, label=f"{ref.base} {split}")
    _log_x(ax, xs)
    ax.set_xlabel(name)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against {name} (dashed: reference runs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    path = plots._save(fig, exp_dir.path / "figures" / f"sweep-{base}-{name}.png")
    return Figure(path.relative_to(exp_dir.path), f"{base}: {metric} against {name} per split")


def _params_figure(
    exp_dir: ExperimentDir, base: str, swept: list[Group], references: list[Group], splits: list[str], metric: str
) -> Figure:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.8, 3.8), dpi=110)
    with_params = [g for g in swept if g.trainable()]
    xs = [g.trainable() or 0 for g in with_params]
    for i, split in enumerate(splits):
        color = f"C{i}"
        _spread(ax, xs, [g.values(split, metric) for g in with_params], color, f"{base} {split}")
        for ref in references:
            values = ref.values(split, metric)
            if values and ref.trainable():
                ax.axhline(mean(values), color=color, ls="--", lw=1)
                ax.plot([ref.trainable()], [mean(values)], "s", color=color, label=f"{ref.base} {split}")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    path = plots._save(fig, exp_dir.path / "figures" / f"sweep-{base}-params.png")
    return Figure(
        path.relative_to(exp_dir.path), f"{base}: {metric} against trainable parameters (squares: reference runs)"
    )


def _spread(ax: Any, xs: list[float], values: list[list[float]], color: str, label: str) -> None:
    """Mean line with ± std bars, and each seed as a small dot: the spread, not just the mean."""
    points = [(x, v) for x, v in zip(xs, values, strict=True) if v]
    if not points:
        return
    ax.errorbar(
        [p[0] for p in points],
        [mean(p[1]) for p in points],
        yerr=[std(p[1]) for p in points],
        fmt="o-",
        color=color,
        capsize=3,
        label=label,
    )
    singles = [(x, v) for x, vs in points if len(vs) > 1 for v in vs]
    if singles:
        ax.plot([s[0] for s in singles], [s[1] for s in singles], ".", color=color, alpha=0.4, ms=4)


# --- seeds -----------------------------------------------------------------------------------


def seed_blocks(exp_dir: ExperimentDir, groups: list[Group], splits: list[str], metric: str) -> list[Block]:
    seeded = [g for g in groups if len(g.runs) > 1]
    if not seeded:
        return []
    header = ["Method entry", "Point", "Seeds", *(f"{s} {metric}" for s in splits), "Train time (s)"]
    rows = []
    for g in seeded:
        seconds = [float(r.metrics()["train"]["train_seconds"]) for r in g.done()]
        rows.append(
            [g.base, point_label(g.point), f"{len(g.done())}/{len(g.runs)}"]
            + [fmt_mean_std(g.values(s, metric)) for s in splits]
            + [fmt_mean_std(seconds, 1)]
        )
    caption = "Mean ± sample standard deviation over the seeds (train.seeds); Seeds: finished / planned."
    return [Heading("Across seeds"), Table(header, rows, caption), _seed_figure(exp_dir, seeded, splits, metric)]


def _seed_figure(exp_dir: ExperimentDir, groups: list[Group], splits: list[str], metric: str) -> Figure:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(groups) + 2), 3.6), dpi=110)
    width = 0.8 / max(len(splits), 1)
    for i, split in enumerate(splits):
        for j, g in enumerate(groups):
            values = g.values(split, metric)
            if not values:
                continue
            x = j + (i - (len(splits) - 1) / 2) * width
            ax.errorbar(
                [x],
                [mean(values)],
                yerr=[std(values)],
                fmt="o",
                color=f"C{i}",
                capsize=3,
                label=split if j == 0 else None,
            )
            ax.plot([x] * len(values), values, ".", color=f"C{i}", alpha=0.5)
    labels = [g.base + (f"\n{point_label(g.point)}" if g.point else "") for g in groups]
    ax.set_xticks(range(len(groups)), labels, fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} across seeds (dots: single seeds)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    path = plots._save(fig, exp_dir.path / "figures" / "seeds.png")
    return Figure(Path(path).relative_to(exp_dir.path), f"{metric} per run group: mean ± std and each seed")
