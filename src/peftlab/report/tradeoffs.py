"""The rank trade-off study's evidence: forgetting per run, scores against the swept setting, and
the learning-vs-forgetting plane (Biderman et al. 2024, "LoRA Learns Less and Forgets Less").

Built from what the runs wrote: each run's metrics.json (`eval` per split and extra set, and
`forgetting` with base, run and change per general set) and the group's baselines (the zero-shot
model). Nothing is recomputed here.

- Forgetting table: per general set, the base model's score, each run's score and the change.
- Against the swept setting (e.g. lora.r): in-domain score, each out-of-domain set, and forgetting,
  one panel each, with full fine-tuning (runs outside the sweep) and the zero-shot model as
  reference lines; seeds as error bars.
- The plane: x = forgetting (mean drop on the general benchmarks, as a fraction of a perfect score;
  cross-entropy rise in nats when the only general sets are text), y = in-domain gain over the
  zero-shot model; one point per run, and which runs sit on the Pareto front (no other run gains
  more while forgetting less).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.config import SPLITS
from peftlab.forgetting import forgetting_of, run_record
from peftlab.report import compare, plots
from peftlab.report.render import Block, Figure, Figures, Heading, Paragraph, Table
from peftlab.report.sweeps import Group, _log_x, _single_numeric_axis, _spread, fmt_mean_std, groups_of
from peftlab.store import DONE, ExperimentDir, RunDir
from peftlab.sweep import mean


@dataclass
class Point:
    """One finished run on the plane."""

    run: str
    forgetting: float
    gain: float


def tradeoff_blocks(
    exp_dir: ExperimentDir, runs: list[RunDir], baselines: dict[str, Any], split: str, tag: str = ""
) -> list[Block]:
    """Every trade-off block that applies to these runs (one task's runs); [] when none does.

    `baselines` is the group's baselines mapping (name -> split -> metrics); `split` the in-domain
    split; `tag` names the task in headings and figure files of a multi-task report.
    """
    done = [r for r in runs if r.status().get("state") == DONE and r.metrics()]
    if not done:
        return []
    task = done[0].metrics().get("task", {})
    metric, scale = task.get("primary_metric"), float(task.get("score_scale") or 1.0)
    sign = 1.0 if task.get("higher_is_better", True) else -1.0  # the plane's "gain" is an improvement
    if not metric:
        return []
    zero_shot = (baselines.get("untrained model") or {}).get(split, {}).get(metric)
    blocks = forgetting_table_blocks(done, tag)
    untrained = baselines.get("untrained model") or {}
    blocks += axis_tradeoff_blocks(exp_dir, done, split, metric, untrained, tag)
    blocks += plane_blocks(exp_dir, done, split, metric, sign * scale, zero_shot, tag)
    return blocks


# --- forgetting table ------------------------------------------------------------------------


def _sets(runs: list[RunDir]) -> dict[str, dict[str, Any]]:
    """Forgetting set name -> one run's record of it (for the metric, direction and base scores)."""
    found: dict[str, dict[str, Any]] = {}
    for run in runs:
        for name, entry in run_record(run).items():
            if "error" not in entry:  # a set that failed to score has no base or metric to show
                found.setdefault(name, entry)
    return found


def forgetting_table_blocks(runs: list[RunDir], tag: str) -> list[Block]:
    sets = _sets(runs)
    if not sets:
        return []
    header = ["Run", *(f"{name} {entry['metric']}" for name, entry in sets.items()), "forgetting (mean)"]
    rows = [["base model", *(_fmt(entry["base"].get(entry["metric"])) for entry in sets.values()), "—"]]
    for run in runs:
        record = run_record(run)
        cells = []
        for name, entry in sets.items():
            mine = record.get(name)
            if not mine or "error" in mine:
                cells.append("failed" if mine else "—")
                continue
            value, change = mine["run"].get(entry["metric"]), mine["change"].get(entry["metric"])
            cells.append(f"{_fmt(value)} ({change:+.4f})" if isinstance(change, int | float) else _fmt(value))
        rows.append([run.name, *cells, _fmt(mean_forgetting(record))])
    directions = "; ".join(
        f"{name}: {entry['task']} on {entry['n']} examples, {_better(entry)} is better" for name, entry in sets.items()
    )
    caption = (
        "Each run's score on general sets it never trained on, with the change from the base model in brackets "
        "(run − base). Forgetting (mean) = how much worse than the base, averaged over the benchmark sets (drop "
        "in score as a fraction; the cross-entropy rise in nats where only text sets exist): positive = forgot. "
        + directions
    )
    return [Heading(f"Forgetting{_of(tag)}"), Table(header, rows, caption)]


def mean_forgetting(record: dict[str, Any]) -> float | None:
    """The plane's x: mean drop over the scored benchmark sets; over the text sets when there are only those."""
    benchmarks = [forgetting_of(e) for e in record.values() if e.get("higher_is_better", True)]
    values = [v for v in benchmarks if v is not None] or [
        v for v in (forgetting_of(e) for e in record.values()) if v is not None
    ]
    return mean(values) if values else None


def _forgetting_short(runs: list[RunDir]) -> str:
    return "mean drop" if any(e.get("higher_is_better", True) for e in _sets(runs).values()) else "CE rise"


def _forgetting_unit(runs: list[RunDir]) -> str:
    sets = _sets(runs).values()
    if any(e.get("higher_is_better", True) for e in sets):
        return "mean drop on the general benchmarks (fraction)"
    return "cross-entropy rise on general text (nats/token)"


# --- against the swept setting ---------------------------------------------------------------


def axis_tradeoff_blocks(
    exp_dir: ExperimentDir, runs: list[RunDir], split: str, metric: str, untrained: dict[str, Any], tag: str
) -> list[Block]:
    groups = groups_of(runs)
    swept = [g for g in groups if g.point]
    axis = _single_numeric_axis([g.point for g in swept]) if len(swept) > 1 else None
    if axis is None:
        return []
    swept.sort(key=lambda g: g.point[axis])
    references = [g for g in groups if not g.point]
    extra = [s for s in _evaluated(runs) if s not in SPLITS]

    def zero(s: str) -> Any:
        return (untrained.get(s) or {}).get(metric)

    panels = [(f"in domain ({split})", lambda g, s=split: g.values(s, metric), zero(split))]
    panels += [(f"{s} (extra)", lambda g, s=s: g.values(s, metric), zero(s)) for s in extra]
    if _sets(runs):
        panels.append((f"forgetting ({_forgetting_short(runs)})", _group_forgetting, 0.0))
    figure = _axis_figure(exp_dir, axis, swept, references, panels, metric, tag)
    name = axis.split(".")[-1]
    header = [name, *(title for title, _, _ in panels)]
    rows = [[f"{g.point[axis]:g}", *(fmt_mean_std(values(g)) for _, values, _ in panels)] for g in swept]
    rows += [[f"{g.base} (reference)", *(fmt_mean_std(values(g)) for _, values, _ in panels)] for g in references]
    rows.append(["zero-shot model", *(_fmt(ref) if ref is not None else "—" for _, _, ref in panels)])
    caption = (
        f"{metric} in and out of domain and forgetting for each {name} (mean ± std over seeds where several); "
        "full fine-tuning and the zero-shot model as references."
    )
    return [Heading(f"Rank trade-off{_of(tag)}"), Table(header, rows, caption), Figures([figure])]


def _group_forgetting(group: Group) -> list[float]:
    values = [mean_forgetting(run_record(r)) for r in group.done()]
    return [v for v in values if v is not None]


def _evaluated(runs: list[RunDir]) -> list[str]:
    names: dict[str, None] = {}
    for run in runs:
        names.update(dict.fromkeys(run.metrics().get("eval") or {}))
    return list(names)


def _axis_figure(
    exp_dir: ExperimentDir,
    axis: str,
    swept: list[Group],
    references: list[Group],
    panels: list[tuple[str, Any, Any]],
    metric: str,
    tag: str,
) -> Figure:
    import matplotlib.pyplot as plt

    name = axis.split(".")[-1]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=110, squeeze=False)
    xs = [g.point[axis] for g in swept]
    for ax, (title, values, zero) in zip(axes[0], panels, strict=True):
        _spread(ax, xs, [values(g) for g in swept], "C0", swept[0].base if swept else "")
        for j, ref in enumerate(references):
            found = values(ref)
            if found:
                ax.axhline(mean(found), color=f"C{j + 1}", ls="--", lw=1.2, label=ref.base)
        if zero is not None:
            ax.axhline(
                float(zero), color="gray", ls=":", lw=1.2, label="zero-shot" if "forgetting" not in title else "base"
            )
        _log_x(ax, xs)
        ax.set_xlabel(name)
        ax.set_ylabel(metric if "forgetting" not in title else "forgetting")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    path = plots._save(fig, exp_dir.path / "figures" / f"tradeoff{_file(tag)}-{name}.png")
    return Figure(
        path.relative_to(exp_dir.path),
        f"{metric} in and out of domain, and forgetting, against {name} (dashed: full fine-tuning; dotted: zero-shot)",
    )


# --- the learning-vs-forgetting plane --------------------------------------------------------


def plane_points(runs: list[RunDir], split: str, metric: str, scale: float, zero_shot: Any) -> list[Point]:
    """One point per finished run with both a forgetting record and an in-domain score."""
    points = []
    for run in runs:
        metrics = run.metrics()
        x = mean_forgetting(run_record(run))
        score = (metrics.get("eval") or {}).get(split, {}).get(metric)
        if x is None or not isinstance(score, int | float):
            continue
        base = float(zero_shot) if isinstance(zero_shot, int | float) else 0.0
        points.append(Point(run.name, x, (float(score) - base) / scale))
    return points


def pareto_front(points: list[Point]) -> list[Point]:
    """The points no other point beats on both axes (less or equal forgetting and more or equal gain,
    better on one): the runs worth choosing among."""

    return compare.pareto_front(points, cost=lambda p: p.forgetting, score=lambda p: p.gain)


def plane_blocks(
    exp_dir: ExperimentDir, runs: list[RunDir], split: str, metric: str, scale: float, zero_shot: Any, tag: str
) -> list[Block]:
    points = plane_points(runs, split, metric, scale, zero_shot)
    if not points:
        return []
    front = pareto_front(points)
    figure = _plane_figure(exp_dir, points, front, split, metric, zero_shot is not None, runs, tag)
    summary = pareto_summary(points, front, metric, "gain" if zero_shot is not None else "score")
    summary += _noise_note(runs, split, metric, scale)
    return [Heading(f"Learning vs forgetting{_of(tag)}"), Paragraph(summary), figure]


def _noise_note(runs: list[RunDir], split: str, metric: str, scale: float) -> str:
    """How big a difference the in-domain test set can tell from chance: one binomial standard error
    of a fraction-valued score (accuracy, exact match) at the runs' mean score, with n test examples."""
    found = [(r.metrics().get("eval") or {}).get(split, {}) for r in runs]
    scores = [float(m[metric]) / abs(scale) for m in found if isinstance(m.get(metric), int | float)]
    sizes = [int(m["n"]) for m in found if isinstance(m.get("n"), int)]
    if not scores or not sizes or abs(abs(scale) - 1.0) > 1e-9 or not all(0 <= v <= 1 for v in scores):
        return ""
    p, n = mean(scores), min(sizes)
    se = math.sqrt(max(p * (1 - p), 1e-12) / n)
    return (
        f" With {n} {split} examples one standard error of {metric} is about {se:.3f} (at {p:.3f}): "
        f"differences under {2 * se:.3f} are within noise."
    )


def pareto_summary(points: list[Point], front: list[Point], metric: str, y: str = "gain") -> str:
    """One generated paragraph: which runs sit on the front, and what each other run is beaten by.

    `y` names the vertical axis: "gain" over the zero-shot model, or the in-domain "score" itself."""
    names = {p.run for p in front}

    def shown(p: Point) -> str:
        return f"{p.run} ({y} {p.gain:+.3f}, forgetting {p.forgetting:+.3f})"

    lines = [
        f"On the Pareto front (no other run has a higher in-domain {y} while forgetting less): "
        + ", ".join(shown(p) for p in front)
        + "."
    ]
    for p in points:
        if p.run in names:
            continue
        better = [q.run for q in points if q.forgetting <= p.forgetting and q.gain >= p.gain and q.run != p.run]
        lines.append(f"{shown(p)} is beaten by {', '.join(better)}.")
    best = max(points, key=lambda p: p.gain)
    least = min(points, key=lambda p: p.forgetting)
    lines.append(f"Highest in-domain {metric}: {best.run}; least forgetting: {least.run}.")
    return " ".join(lines)


def _plane_figure(
    exp_dir: ExperimentDir,
    points: list[Point],
    front: list[Point],
    split: str,
    metric: str,
    has_zero_shot: bool,
    runs: list[RunDir],
    tag: str,
) -> Figure:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.8, 4.2), dpi=110)
    ax.scatter([p.forgetting for p in points], [p.gain for p in points], color="C0", zorder=3)
    for p in points:
        ax.annotate(p.run.split(".")[-1], (p.forgetting, p.gain), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.plot([p.forgetting for p in front], [p.gain for p in front], "--", color="C3", lw=1, label="Pareto front")
    ax.axvline(0, color="gray", lw=0.8)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel(f"forgetting: {_forgetting_unit(runs)}  (→ worse)")
    ax.set_ylabel(f"{split} {metric} gain over zero-shot" if has_zero_shot else f"{split} {metric}")
    ax.set_title("Learning vs forgetting (one point per run)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = plots._save(fig, exp_dir.path / "figures" / f"learning-vs-forgetting{_file(tag)}.png")
    return Figure(
        Path(path).relative_to(exp_dir.path),
        "Learning vs forgetting: up = better in domain"
        + (" than the zero-shot model" if has_zero_shot else "")
        + ", right = more forgetting",
    )


# --- formatting ------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "—"


def _better(entry: dict[str, Any]) -> str:
    return "higher" if entry.get("higher_is_better", True) else "lower"


def _of(tag: str) -> str:
    return f" ({tag})" if tag else ""


def _file(tag: str) -> str:
    return f"-{tag}" if tag else ""
