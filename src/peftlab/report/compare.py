"""The comparison view: score against cost, one point per run, the Pareto front marked.

As PEFT's method_comparison app plots memory against accuracy, this plots the primary score on the
last in-domain split against two measured costs from each run's metrics.json: trainable parameters
(`params.trainable`, log axis) and training time (`train.train_seconds`). One point per run as the
results table has them (method entry, model, sweep point); the seeds of one point are averaged, with
± std error bars. A run is on the Pareto front of a plane when no other run scores at least as well
at no more cost (and strictly better on one of the two). Nothing is assumed: a run without one of
the numbers is left out of that plane, and said; fewer than two points give no section.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from peftlab.report import fmt_seconds, plots
from peftlab.report.render import Block, Figure, Figures, Heading, Paragraph, Table
from peftlab.report.sweeps import Group, fmt_mean_std, groups_of
from peftlab.store import DONE, ExperimentDir, RunDir
from peftlab.sweep import mean, std


@dataclass
class Point:
    """One run (the mean of its seeds) with its score and its measured costs."""

    label: str
    method: str
    scores: list[float]
    params: float | None  # trainable parameters (None: not recorded)
    seconds: list[float]  # training seconds per seed (empty: not recorded)

    @property
    def score(self) -> float:
        return mean(self.scores)

    @property
    def time(self) -> float | None:
        return mean(self.seconds) if self.seconds else None


@dataclass
class Plane:
    """One cost axis: its name, how a point's cost is read, and the file its figure goes to."""

    key: str
    name: str
    unit: str
    cost: Callable[[Point], float | None]


PLANES = (
    Plane("params", "trainable parameters", "", lambda p: p.params),
    Plane("time", "training time", "s", lambda p: p.time),
)


def comparison_blocks(
    exp_dir: ExperimentDir,
    runs: list[RunDir],
    baselines: dict[str, Any],
    split: str,
    primary: str | None = None,
    tag: str = "",
) -> list[Block]:
    """Score against trainable parameters and against training time, with each plane's Pareto front.

    `baselines` maps a baseline's name to its metrics per split (drawn as reference lines); `primary`
    is the metric when the runs' metrics.json do not name it; `tag` names the task in a multi-task
    report. [] for fewer than two runs with a score.
    """
    done = [r for r in runs if r.status().get("state") == DONE and r.metrics()]
    task = next((r.metrics().get("task") for r in done if r.metrics().get("task")), None) or {}
    metric = task.get("primary_metric") or primary
    if not metric:
        return []
    higher = bool(task.get("higher_is_better", True))
    points = comparison_points(done, split, metric)
    drawn = [(plane, [p for p in points if plane.cost(p) is not None]) for plane in PLANES]
    drawn = [(plane, found) for plane, found in drawn if len(found) >= 2]
    if not drawn:
        return []
    fronts = {plane.key: pareto_front(found, plane.cost, higher) for plane, found in drawn}
    figures = [
        _figure(exp_dir, plane, found, fronts[plane.key], split, metric, higher, baselines, tag)
        for plane, found in drawn
    ]
    blocks: list[Block] = [Heading(f"Score against cost{f' ({tag})' if tag else ''}")]
    blocks.append(Paragraph(_summary(points, drawn, fronts, split, metric, higher)))
    blocks.append(_front_table(points, fronts, split, metric))
    return [*blocks, Figures(figures)]


# --- points and fronts -----------------------------------------------------------------------


def comparison_points(runs: list[RunDir], split: str, metric: str) -> list[Point]:
    """One point per (method entry, sweep point) with a score on `split`; seeds averaged."""
    points = []
    for group in groups_of(runs):
        scores = group.values(split, metric)
        if not scores:
            continue
        points.append(
            Point(_label(group), _method(group), scores, _mean_of(group, "params", "trainable"), _seconds(group))
        )
    return points


def _label(group: Group) -> str:
    """The run's name; for several seeds, their common name (`lora-r8-seed0` -> `lora-r8`)."""
    names = [r.name for r in group.done()]
    if len(names) == 1:
        return names[0]
    stems = {re.sub(r"-seed\d+$", "", n) for n in names}
    return stems.pop() if len(stems) == 1 else group.base


def _method(group: Group) -> str:
    return str(next((r.config().get("method") for r in group.done() if r.config().get("method")), group.base))


def _numbers(group: Group, section: str, key: str) -> list[float]:
    found = [(r.metrics().get(section) or {}).get(key) for r in group.done()]
    return [float(v) for v in found if isinstance(v, int | float) and not isinstance(v, bool)]


def _mean_of(group: Group, section: str, key: str) -> float | None:
    """The mean trainable count; None when not recorded or not positive (no place on a log axis)."""
    values = [v for v in _numbers(group, section, key) if v > 0]
    return mean(values) if values else None


def _seconds(group: Group) -> list[float]:
    return [v for v in _numbers(group, "train", "train_seconds") if v > 0]


P = TypeVar("P")


def pareto_front(
    points: list[P],
    cost: Callable[[P], float | None],
    higher: bool = True,
    score: Callable[[P], float] = lambda p: p.score,  # type: ignore[attr-defined]
) -> list[P]:
    """The points no other point beats on both score and cost (at least as good on both, strictly
    better on one), cheapest first; points without the cost are not candidates. Also the front of
    the learning-vs-forgetting plane (report/tradeoffs.py)."""
    sign = 1.0 if higher else -1.0
    found = [(p, float(c), sign * score(p)) for p in points if (c := cost(p)) is not None]

    def beaten(c: float, s: float) -> bool:
        return any(qc <= c and qs >= s and (qc < c or qs > s) for _, qc, qs in found)

    return [p for p, c, s in sorted(found, key=lambda t: t[1]) if not beaten(c, s)]


# --- text ------------------------------------------------------------------------------------


def _summary(
    points: list[Point],
    drawn: list[tuple[Plane, list[Point]]],
    fronts: dict[str, list[Point]],
    split: str,
    metric: str,
    higher: bool,
) -> str:
    better = "higher" if higher else "lower"
    lines = [
        f"One point per run ({split} {metric}, mean ± std over seeds where several) against the cost each run "
        "measured (trainable parameters and training seconds, from its metrics.json). A run is Pareto-optimal "
        f"on a plane when no other run has an equal or {better} {metric} at equal or lower cost, and is better "
        "on one of the two."
    ]
    for plane, found in drawn:
        front = fronts[plane.key]
        lines.append(f"Front against {plane.name}: {', '.join(p.label for p in front)}.")
        missing = [p.label for p in points if p not in found]
        if missing:
            lines.append(f"Left out of that plane (not recorded): {', '.join(missing)}.")
    on_any = {id(p) for front in fronts.values() for p in front}
    beaten = [p.label for p in points if id(p) not in on_any and any(p in found for _, found in drawn)]
    if beaten:
        lines.append(f"Beaten on every plane: {', '.join(beaten)}.")
    return " ".join(lines)


def _front_table(points: list[Point], fronts: dict[str, list[Point]], split: str, metric: str) -> Table:
    """The Pareto-optimal runs of either plane with their numbers."""
    titles = {plane.key: plane.name for plane in PLANES}
    seeds = any(len(p.scores) > 1 for p in points)
    header = ["Run", "Method", *(["Seeds"] if seeds else []), "Trainable params", "Train time", f"{split} {metric}"]
    rows = []
    for p in points:
        on = [titles[key] for key, front in fronts.items() if any(q is p for q in front)]
        if not on:
            continue
        time = "—" if p.time is None else _fmt_time(p.seconds)
        params = f"{p.params:,.0f}" if p.params is not None else "—"
        seeded = [str(len(p.scores))] if seeds else []
        rows.append([p.label, p.method, *seeded, params, time, fmt_mean_std(p.scores), ", ".join(on)])
    caption = "Pareto-optimal runs: no other run scores better at no more cost on the plane(s) named."
    return Table([*header, "Pareto-optimal against"], rows, caption)


def _fmt_time(seconds: list[float]) -> str:
    """As the results table writes times (fmt_seconds: "2 min 05 s" from two minutes on)."""
    if len(seconds) == 1:
        return fmt_seconds(seconds[0])
    return f"{fmt_seconds(mean(seconds))} ± {fmt_seconds(std(seconds))}"


# --- figures ---------------------------------------------------------------------------------


def _figure(
    exp_dir: ExperimentDir,
    plane: Plane,
    points: list[Point],
    front: list[Point],
    split: str,
    metric: str,
    higher: bool,
    baselines: dict[str, Any],
    tag: str,
) -> Figure:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.8, 4.0), dpi=110)
    methods = list(dict.fromkeys(p.method for p in points))
    for i, method in enumerate(methods):
        mine = [p for p in points if p.method == method]
        xs = [float(plane.cost(p) or 0.0) for p in mine]
        xerr = [std(p.seconds) for p in mine] if plane.key == "time" else None
        ax.errorbar(
            xs,
            [p.score for p in mine],
            yerr=[std(p.scores) for p in mine],
            xerr=xerr,
            fmt="o",
            color=f"C{i % 10}",
            capsize=3,
            label=method,
            zorder=3,
        )
    for p in points:
        xy = (float(plane.cost(p) or 0.0), p.score)
        ax.annotate(p.label, xy, fontsize=7, xytext=(4, 3), textcoords="offset points")
    fx = [float(plane.cost(p) or 0.0) for p in front]
    ax.step(fx, [p.score for p in front], where="post", ls="--", color="C3", lw=1, label="Pareto front")
    ax.plot(fx, [p.score for p in front], "o", ms=12, mfc="none", mec="C3", zorder=4)
    for j, (name, by_split) in enumerate(sorted(baselines.items())):
        value = (by_split.get(split) or {}).get(metric)
        if isinstance(value, int | float):
            ax.axhline(float(value), color="gray", ls=(":", "-.")[j % 2], lw=1, label=name)
    costs = [float(plane.cost(p) or 0.0) for p in points]
    if plane.key == "params" or max(costs) / min(costs) >= 10:
        ax.set_xscale("log")
    notes = [n for n in (plane.unit, "log scale" if ax.get_xscale() == "log" else "") if n]
    ax.set_xlabel(plane.name + (f" ({', '.join(notes)})" if notes else ""))
    ax.set_ylabel(f"{split} {metric}" + ("" if higher else " (lower is better)"))
    ax.set_title(f"{metric} against {plane.name}{f' ({tag})' if tag else ''}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    suffix = f"-{tag}" if tag else ""
    path = plots._save(fig, exp_dir.path / "figures" / f"compare{suffix}-{plane.key}.png")
    return Figure(
        path.relative_to(exp_dir.path),
        f"{split} {metric} against {plane.name}: one point per run; circled on the dashed line: the Pareto front",
    )
