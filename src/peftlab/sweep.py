"""Sweeps: grids over dotted settings, seeds, and the sweep-then-train protocol.

`expand` turns the experiment's method entries into runs: one per grid point and per seed, each
with a readable name (`lora-r8`, `lora-lr3e-05-seed1`). It runs while the experiment file is
validated, so an unknown key, an empty grid or a value a setting cannot take is reported (exit 2)
before anything is loaded. Grid keys:

  train.KEY          a training setting, for every run          (train.lr: [5e-5, 3e-5, 1e-5])
  METHOD.KEY         a setting of every run of that method      (lora.r: [1, 2, 4, 8])
  RUN.KEY            a setting of one method entry (its name)   (lora_small.target_modules: [...])
  RUN.train.KEY      a training setting of one method entry     (ia3.train.lr: [1e-3, 3e-3])

A more specific key replaces a broader one for the same setting. `train.lr: auto` is a grid
around each method's own default learning rate (`AUTO_LR_FACTORS`), so that one method is never
starved with another's rate.

Protocols: `grid` (default) trains every point in full and reports them all (a rank sweep).
`sweep-then-train` (the LoRA-vs-(IA)3 study's protocol) trains each point for `epochs` on
`fraction` of the training data, keeps no model, scores it on the validation split, selects the
best point per method entry by `metric` and `direction` (mean over seeds), then trains that
point in full under the entry's own name. Sweep points live in `<experiment>/sweep/`.

In a multi-model / multi-task experiment each (model, task) group is expanded on its own with the
same grid (a RUN key names the method entry, not the dotted model.task.entry run name); its points
are named after the group's runs (`bert.ner.lora-r8`), and the sweep-then-train protocol selects
per method entry of each group.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from peftlab.config import Experiment, RunSpec, SweepSpec, TaskSpec, TrainSpec
from peftlab.errors import did_you_mean

if TYPE_CHECKING:
    from peftlab.experiment import Prepared
    from peftlab.store import ExperimentDir, RunDir

# `train.lr: auto` -> default x these. Three points like the study's grid, half a decade apart on a
# log scale (10**0.5 ~ 3), centred on the method's default: the grid spans one decade, which covers
# the published ranges around each default (full FT 2e-5..1e-4, LoRA 1e-4..1e-3, (IA)3 1e-3..1e-2),
# and a choice at either end is flagged in the report as "widen the grid".
AUTO_LR_FACTORS = (0.3, 1.0, 3.0)
SWEEP_DIR = "sweep"
PLAN_FILE = "sweep.json"
DEFAULT_FRACTION = 0.1
DEFAULT_EPOCHS = 1


@dataclass
class Candidate:
    """One grid point of one method entry, at full size: one run per seed."""

    point: dict[str, Any]
    runs: list[RunSpec]


@dataclass
class SweepPlan:
    """What `expand` made of the experiment's sweep section and seeds."""

    protocol: str = "grid"
    metric: str = "loss"
    direction: str = "min"
    fraction: float = 1.0
    epochs: int | None = None
    runs: list[RunSpec] = field(default_factory=list)  # trained as they are
    sweep_runs: list[RunSpec] = field(default_factory=list)  # sweep-then-train: the short sweep points
    candidates: dict[str, list[Candidate]] = field(default_factory=dict)  # base -> its full-size points

    def first_runs(self) -> list[RunSpec]:
        """Every run known before training (the final runs of sweep-then-train come after selection)."""
        return [*self.sweep_runs, *self.runs]


def combine(plans: list[SweepPlan]) -> SweepPlan:
    """The plans of the (model, task) groups of a multi-task experiment as one (for `plan` and sweep.json).

    The groups share the sweep section, so protocol, metric and direction agree; the method entries'
    run names carry their group (model.task.entry), so the candidates do not collide.
    """
    if not plans:
        return SweepPlan()
    out = dataclasses.replace(plans[0], runs=[], sweep_runs=[], candidates={})
    for plan in plans:
        out.runs += plan.runs
        out.sweep_runs += plan.sweep_runs
        out.candidates.update(plan.candidates)
    return out


@dataclass(frozen=True)
class Axis:
    """One swept setting of one run: the grid key, where the value goes, and the values."""

    key: str
    target: str  # "train" or "method"
    name: str  # the setting's field name
    values: list[Any]


# --- expansion -------------------------------------------------------------------------------


def expand(spec: Experiment, task: TaskSpec, runs: list[RunSpec], problems: Any) -> SweepPlan:
    """Runs of the experiment with the sweep grid and seeds expanded; problems go to `problems`."""
    sweep = spec.sweep
    plan = SweepPlan()
    if sweep is not None:
        _check_protocol(sweep, task, plan, problems)
    grid = flatten_grid(sweep.grid) if sweep is not None else {}
    if sweep is not None and not grid:
        problems.add(("sweep", "grid"), "empty grid: give at least one KEY: [values]")
    keys = {key: _parse_key(key, spec, problems) for key in grid}
    index = itertools.count()
    for run in runs:
        axes = _axes_for(run, {k: v for k, v in keys.items() if v is not None}, grid, problems)
        seeds = run.train.seeds or spec.train.seeds
        candidates = [Candidate(point, _with_seeds(r, seeds, index)) for point, r in _points(run, axes)]
        if sweep is not None and sweep.protocol == "sweep-then-train" and axes:
            plan.candidates[run.name] = candidates
            plan.sweep_runs += [_short(r, plan) for c in candidates for r in c.runs]
        else:
            plan.runs += [r for c in candidates for r in c.runs]
    _check_unique(plan, problems)
    if sweep is not None and sweep.protocol == "sweep-then-train" and not plan.candidates and runs:
        problems.add(("sweep", "grid"), "sweep-then-train: no key of the grid applies to any run")
    return plan


def flatten_grid(grid: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{train: {lr: [..]}}` and `{train.lr: [..]}` alike -> {"train.lr": [..]} (later keys win).

    Nested mappings come from `--set sweep.grid.train.lr=[...]`, which splits keys on dots.
    """
    flat: dict[str, Any] = {}
    for key, value in grid.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_grid(value, f"{full}."))
        else:
            flat[full] = value
    return flat


def _check_protocol(sweep: SweepSpec, task: TaskSpec, plan: SweepPlan, problems: Any) -> None:
    from peftlab.tasks import TASKS

    task_cls = TASKS.get(task.name)
    known = {"loss", task_cls.primary_metric, *task_cls.higher_is_better}
    if sweep.metric not in known:
        problems.add(
            ("sweep", "metric"),
            f"the {task.name} task does not report '{sweep.metric}'{did_you_mean(sweep.metric, known)}; "
            f"expected one of: {', '.join(sorted(known))}",
        )
    higher = task_cls.higher_is_better.get(sweep.metric, sweep.metric != "loss")
    plan.protocol, plan.metric = sweep.protocol, sweep.metric
    plan.direction = sweep.direction or ("max" if higher else "min")
    if sweep.protocol == "grid":
        for key in ("fraction", "epochs"):
            if getattr(sweep, key) is not None:
                problems.add(("sweep", key), "only used with protocol: sweep-then-train")
    else:
        plan.fraction = sweep.fraction if sweep.fraction is not None else DEFAULT_FRACTION
        plan.epochs = sweep.epochs or DEFAULT_EPOCHS


def _parse_key(key: str, spec: Experiment, problems: Any) -> tuple[str, str, str] | None:
    """A grid key -> (scope, target, field): scope is '*', 'method:NAME' or 'run:NAME'."""
    from peftlab.methods import METHODS

    parts = key.split(".")
    where = ("sweep", "grid", key)
    if parts[0] == "train":
        scope, rest = "*", parts[1:]
    elif parts[0] in spec.methods:
        scope, rest = f"run:{parts[0]}", parts[1:]
    elif parts[0] in METHODS:
        scope, rest = f"method:{parts[0]}", parts[1:]
        if not any(_run_method(spec, name) == parts[0] for name in spec.methods):
            problems.add(where, f"no run uses the method '{parts[0]}'")
            return None
    else:
        names = ["train", *spec.methods, *METHODS.names()]
        problems.add(
            where,
            f"unknown key: '{parts[0]}' is neither 'train', a run nor a method{did_you_mean(parts[0], names)}; "
            "expected train.KEY, METHOD.KEY, RUN.KEY or RUN.train.KEY",
        )
        return None
    target = "train" if scope == "*" or rest[:1] == ["train"] else "method"
    if target == "train" and scope != "*":
        rest = rest[1:]
    if len(rest) != 1:
        problems.add(where, "expected train.KEY, METHOD.KEY, RUN.KEY or RUN.train.KEY (one setting per key)")
        return None
    if target == "train":
        return (scope, target, rest[0]) if _check_train_field(rest[0], where, problems) else None
    method = parts[0] if scope.startswith("method:") else _run_method(spec, parts[0])
    known = list(METHODS.get(method).Settings.model_fields)
    if rest[0] not in known:
        problems.add(
            where, f"unknown setting of {method}{did_you_mean(rest[0], known)}; expected one of: {', '.join(known)}"
        )
        return None
    return scope, target, rest[0]


def _check_train_field(name: str, where: tuple[str, ...], problems: Any) -> bool:
    known = [f for f in TrainSpec.model_fields if f not in ("seed", "seeds")]
    if name in ("seed", "seeds"):
        problems.add(where, "seeds are not a grid axis: set train.seeds: [0, 1, 2] (tables then show mean ± std)")
        return False
    if name not in known:
        problems.add(where, f"unknown training setting{did_you_mean(name, known)}; expected one of: {', '.join(known)}")
        return False
    return True


def _run_method(spec: Experiment, run: str) -> str:
    return str((spec.methods[run] or {}).get("method", run))


def _axes_for(run: RunSpec, keys: dict[str, tuple[str, str, str]], grid: dict[str, Any], problems: Any) -> list[Axis]:
    """The axes that apply to `run`; a run-level key beats a method-level one beats a global one."""
    rank = {"*": 0, f"method:{run.method}": 1, f"run:{run.entry}": 2}  # entry: not the model.task. prefix
    chosen: dict[tuple[str, str], tuple[int, str]] = {}
    for key, (scope, target, name) in keys.items():
        if scope in rank and rank[scope] >= chosen.get((target, name), (-1, ""))[0]:
            chosen[(target, name)] = (rank[scope], key)
    axes = []
    for (target, name), (_, key) in chosen.items():
        values = _values(run, key, target, name, grid[key], problems)
        if values is not None:
            axes.append(Axis(key, target, name, values))
    return axes


def _values(run: RunSpec, key: str, target: str, name: str, value: Any, problems: Any) -> list[Any] | None:
    """The grid's values for one run, each validated by the schema of the setting it sets."""
    from peftlab.methods import METHODS

    where = ("sweep", "grid", key)
    method_cls = METHODS.get(run.method)
    if value == "auto" and (target, name) == ("train", "lr"):
        return [float(f"{method_cls.default_lr * f:.3g}") for f in AUTO_LR_FACTORS]
    if not isinstance(value, list):
        problems.add(where, f"expected a list of values (got {value!r})" + ("; or auto" * (name == "lr")))
        return None
    if not value:
        problems.add(where, "empty grid: give at least one value")
        return None
    ok = True
    for item in value:
        try:
            if target == "train":
                TrainSpec.model_validate({**run.train.model_dump(), name: item})
            else:
                method_cls.Settings.model_validate({**run.settings, name: item})
        except ValidationError as exc:
            messages = "; ".join(err["msg"] for err in exc.errors())
            problems.add(where, f"value {item!r}: {messages}")
            ok = False
    return value if ok else None


def _points(run: RunSpec, axes: list[Axis]) -> list[tuple[dict[str, Any], RunSpec]]:
    """Every combination of the axes' values as a run (the run itself when nothing is swept)."""
    if not axes:
        return [({}, run)]
    out = []
    for values in itertools.product(*(axis.values for axis in axes)):
        chosen = list(zip(axes, values, strict=True))
        name = run.name + "".join(f"-{_slug(axis.name, v)}" for axis, v in chosen)
        out.append(({axis.key: v for axis, v in chosen}, _point_run(run, chosen, name)))
    return out


def _slug(name: str, value: Any) -> str:
    """`r` 8 -> r8; `lr` 3e-05 -> lr3e-05; `target_modules` [query, value] -> target_modules_query_value."""
    if isinstance(value, bool) or value is None:
        text = str(value).lower()
    elif isinstance(value, int | float):
        text = f"{value:g}"
    elif isinstance(value, list | tuple):
        text = "_".join(str(v) for v in value)
    else:
        text = str(value)
    glue = "" if text[:1].isdigit() or text[:1] == "-" else "_"
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in f"{name}{glue}{text}")


def _point_run(run: RunSpec, chosen: list[tuple[Axis, Any]], name: str) -> RunSpec:
    """The run with the point's values set (each value was validated in `_values`)."""
    from peftlab.methods import METHODS

    method_cls = METHODS.get(run.method)
    train = {**run.train.model_dump(), **{a.name: v for a, v in chosen if a.target == "train"}}
    settings = {**run.settings, **{a.name: v for a, v in chosen if a.target == "method"}}
    spec = TrainSpec.model_validate(train)
    if spec.lr == "auto":
        spec = spec.model_copy(update={"lr": method_cls.default_lr})
    point = {a.key: v for a, v in chosen}
    settings = method_cls.Settings.model_validate(settings).model_dump()
    return dataclasses.replace(run, name=name, settings=settings, train=spec, base=run.name, point=point)


def _with_seeds(run: RunSpec, seeds: list[int] | None, index: itertools.count) -> list[RunSpec]:
    """One run per seed (named -seedN when there are several); each gets its place in the report order."""
    if not seeds:
        return [dataclasses.replace(run, index=next(index))]
    return [
        dataclasses.replace(
            run,
            name=f"{run.name}-seed{seed}" if len(seeds) > 1 else run.name,
            base=run.base_name,
            train=run.train.model_copy(update={"seed": seed, "seeds": None}),
            index=next(index),
        )
        for seed in seeds
    ]


def _short(run: RunSpec, plan: SweepPlan) -> RunSpec:
    """A sweep point of sweep-then-train: fewer epochs, part of the training data, validation only."""
    return dataclasses.replace(
        run,
        name=f"{SWEEP_DIR}/{run.name}",
        stage="sweep",
        train=run.train.model_copy(update={"epochs": plan.epochs}),
        data_fraction=plan.fraction,
        eval_splits=("validation",),
        save_model=False,
    )


def _check_unique(plan: SweepPlan, problems: Any) -> None:
    seen: set[str] = set()
    for run in plan.first_runs():
        if run.name in seen:
            problems.add(("sweep", "grid"), f"two runs would be named '{run.name}'; rename a method entry")
        seen.add(run.name)


# --- the sweep-then-train protocol -----------------------------------------------------------


@dataclass
class PointResult:
    """What the runs of one grid point (one per seed) measured, read from their folders."""

    base: str
    point: dict[str, Any]
    runs: list[str]
    states: list[str] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    value: list[float] = field(default_factory=list)  # the selection metric

    @property
    def done(self) -> bool:
        return bool(self.value)


def read_point(folders: list[RunDir], base: str, point: dict[str, Any], metric: str) -> PointResult:
    """Last-epoch train and validation loss and the selection metric of each finished run."""
    result = PointResult(base, point, [f.name for f in folders])
    for folder in folders:
        state = folder.status().get("state", "pending")
        result.states.append(state)
        if state != "done":
            continue
        history = folder.history("epoch")  # step rows (training loss every few steps) left out
        train = [r["train_loss"] for r in history if "train_loss" in r]
        val = [r["val_loss"] for r in history if "val_loss" in r]
        result.train_loss += train[-1:]
        result.val_loss += val[-1:]
        value = (
            val[-1] if metric == "loss" and val else folder.metrics().get("eval", {}).get("validation", {}).get(metric)
        )
        if isinstance(value, int | float):
            result.value.append(float(value))
    return result


def choose(results: list[PointResult], direction: str) -> int | None:
    """Index of the best point by the mean of its seeds' values (the first of equals); None if none finished."""
    scored = [(mean(r.value), i) for i, r in enumerate(results) if r.done]
    if not scored:
        return None
    sign = -1 if direction == "max" else 1
    return min(scored, key=lambda s: (sign * s[0], s[1]))[1]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def std(values: list[float]) -> float:
    """Sample standard deviation (n - 1); 0 for a single value."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def plan_record(plan: SweepPlan) -> dict[str, Any]:
    """sweep/sweep.json: the current grid per method entry, so the report ignores stale points."""
    return {
        "protocol": plan.protocol,
        "metric": plan.metric,
        "direction": plan.direction,
        "fraction": plan.fraction,
        "epochs": plan.epochs,
        "bases": {
            base: [{"point": c.point, "runs": [f"{SWEEP_DIR}/{r.name}" for r in c.runs]} for c in cands]
            for base, cands in plan.candidates.items()
        },
    }


def selected_results(store: ExperimentDir, record: dict[str, Any]) -> dict[str, tuple[list[PointResult], int | None]]:
    """Per method entry: each point's results and the index of the chosen one (from files only)."""
    out = {}
    for base, points in record.get("bases", {}).items():
        results = [
            read_point([store.run(name) for name in p["runs"]], base, p["point"], record["metric"]) for p in points
        ]
        out[base] = (results, choose(results, record["direction"]))
    return out


def run_protocol(
    preps: list[Prepared],
    execute: Callable[[list[tuple[Prepared, RunSpec]]], list[str]],
    fresh: bool | list[str],
    log: Any,
) -> list[str]:
    """Train the runs of every (model, task) group by the experiment's protocol; return the failed names.

    Each phase goes to `execute` as one batch across the groups (so `--workers` fills up): the sweep
    points of sweep-then-train first, then after selection the plain runs and the selected ones.
    """
    from peftlab.experiment import check_existing
    from peftlab.store import write_json

    staged = [prep for prep in preps if prep.exp.sweep is not None and prep.exp.sweep.protocol == "sweep-then-train"]
    if not staged:
        return execute([(prep, run) for prep in preps for run in prep.exp.runs])
    plans: list[SweepPlan] = [prep.exp.sweep for prep in staged]  # type: ignore[misc]
    plan = combine(plans)
    record = plan_record(plan)
    store = staged[0].store
    write_json(store.path / SWEEP_DIR / PLAN_FILE, record)
    log(f"sweep: {len(plan.sweep_runs)} point(s) on {plan.fraction:g} of the training data, {plan.epochs} epoch(s)")
    failed = execute([(prep, run) for prep in staged for run in prep.exp.sweep.sweep_runs])  # type: ignore[union-attr]
    selected = selected_results(store, record)
    unselected: list[str] = []
    todo = [(prep, run) for prep in preps if prep not in staged for run in prep.exp.runs]
    for prep in staged:
        finals = []
        for base, candidates in prep.exp.sweep.candidates.items():  # type: ignore[union-attr]
            results, best = selected[base]
            if best is None:
                log(f"[{base}] no sweep point finished: nothing to select, not trained")
                unselected.append(base)
                continue
            finals += _final_runs(candidates[best], base)
            chosen = ", ".join(f"{k}={v}" for k, v in results[best].point.items())
            log(
                f"[{base}] selected {chosen} ({plan.direction} validation {plan.metric} "
                f"{mean(results[best].value):.4f})"
            )
        check_existing(prep, fresh, log, runs=finals)
        todo += [(prep, run) for run in [*prep.exp.sweep.runs, *finals]]  # type: ignore[union-attr]
    return failed + unselected + execute(todo)


def _final_runs(candidate: Candidate, base: str) -> list[RunSpec]:
    """The chosen point in full, under the method entry's own name (-seedN with several seeds)."""
    several = len(candidate.runs) > 1
    return [
        dataclasses.replace(r, name=f"{base}-seed{r.train.seed}" if several else base, stage="final")
        for r in candidate.runs
    ]


def run_meta(run: RunSpec) -> dict[str, Any] | None:
    """What config.yaml records about a run's place in a sweep (None for a plain run)."""
    if not run.point and run.stage == "run" and run.name == run.base_name:
        return None
    return {"base": run.base_name, "stage": run.stage, "point": run.point, "index": run.index}


def point_label(point: dict[str, Any]) -> str:
    """`{"train.lr": 3e-05}` -> "lr 3e-05" (the setting's own name and its value)."""
    if not point:
        return "—"
    return ", ".join(f"{k.split('.')[-1]} {_value_text(v)}" for k, v in point.items())


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def plan_note(plan: SweepPlan | None) -> str:
    """The line `peftlab plan` adds for sweep-then-train: what happens after the sweep."""
    if plan is None or plan.protocol != "sweep-then-train":
        return ""
    bases = ", ".join(plan.candidates)
    return (
        f"sweep-then-train: the sweep/ points train {plan.epochs} epoch(s) on {plan.fraction:g} of the training data; "
        f"then {bases} train in full with the point of {plan.direction} validation {plan.metric}."
    )


def point_key(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True, default=str)
