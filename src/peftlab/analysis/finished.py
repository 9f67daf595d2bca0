"""Analysis of finished runs: `peftlab analyze RUN_DIR...`, and runs an `analysis:` block reaches late.

The run is rebuilt from its folder (trained.load_run) and its evaluated splits are read again from
the run's own data settings (same source, limits and seed, so the same examples as in training), plus
the experiment's extra evaluation sets. Results are cached in `<run>/analysis/` under a key of the
run's fingerprint and the settings: asking again costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.analysis.run import FOLDER, Subject, analyze, check_sizes, current, key_for
from peftlab.analysis.settings import AnalysisSpec
from peftlab.errors import InputError
from peftlab.store import DONE, ExperimentDir, RunDir

if TYPE_CHECKING:
    from datasets import Dataset

    from peftlab.trained import TrainedRun

Log = Callable[[str], None]


def check_finished(path: Path) -> RunDir:
    """The run folder, or InputError naming it when it is not a finished run."""
    folder = RunDir(path)
    if not folder.config_file.exists():
        raise InputError(f"{path}: not a run folder (no config.yaml); expected runs/<experiment>/<run>/")
    state = folder.status().get("state")
    if state != DONE or not folder.adapter_dir.exists():
        raise InputError(f"{path}: the run is not finished (status: {state}); only finished runs can be analysed")
    return folder


def evaluated_splits(folder: RunDir) -> tuple[list[str], dict[str, Any]]:
    """The splits the run was scored on, and the experiment's extra evaluation sets (name -> spec)."""
    config = folder.config()
    experiment = ExperimentDir(folder.path.parent).experiment()
    evaluate = experiment.get("evaluate") or {}
    splits = list(config.get("eval_splits") or evaluate.get("splits") or ["validation", "test"])
    extra = {} if "tasks" in experiment or "models" in experiment else dict(evaluate.get("extra") or {})
    return splits, extra


def examples_of(run: TrainedRun) -> dict[str, Dataset]:
    """The run's evaluated splits (and extra sets) as canonical examples, read as the run read them."""
    from peftlab.config import DataSpec, ExtraEvalSpec
    from peftlab.data.loading import describe_source, load_splits
    from peftlab.trained import read_extra

    splits, extra = evaluated_splits(run.folder)
    data = DataSpec.model_validate(run.config["data"])
    needed = tuple(dict.fromkeys(["train", "validation", *splits]))
    try:
        raw = load_splits(data, None, needed)
    except InputError as exc:
        raise InputError(f"{run.folder.config_file}: data: {exc}") from None
    where = describe_source(data)
    out = {split: run.task.examples_from_rows(raw[split], f"{where} [{split}]") for split in splits if split in raw}
    for name, item in extra.items():
        spec = ExtraEvalSpec.model_validate(item if isinstance(item, dict) else {"source": item})
        out[name] = read_extra(run.task, spec, data.seed)
    return out


def subject_of(run: TrainedRun) -> Subject:
    from peftlab.models import load_config

    config, _ = load_config(run.source)
    return Subject(
        name=run.folder.name,
        method_name=str(run.config["method"]),
        method=run.method,
        model=run.model,
        build_base=run.build_base,
        model_type=config.model_type,
        task=run.task,
        tokenizer=run.tokenizer,
        max_length=run.max_length,
        examples=examples_of(run),
        run_fingerprint=str(run.config.get("fingerprint", "")),
        seed=int(run.config["data"].get("seed", 0)),
    )


def analyze_finished(path: Path, spec: AnalysisSpec, log: Log, *, force: bool = False) -> dict[str, Any]:
    """A finished run's analysis: read back when current, else measured (and kept)."""
    folder = check_finished(path)
    splits, extra = evaluated_splits(folder)
    names = spec.splits if spec.splits is not None else [*splits, *extra]
    found = None if force else current(folder, key_for(str(folder.config().get("fingerprint", "")), spec, names))
    if found is not None:
        log(f"[{folder.name}] analysis: up to date (kept in {folder.path / FOLDER})")
        return found
    from peftlab.trained import load_run

    log(f"[{folder.name}] analysis: rebuilding the trained model ...")
    run = load_run(folder.path)
    subject = subject_of(run)
    check_sizes(spec, {name: len(ds) for name, ds in subject.examples.items()}, f"{folder.path}: ")
    return analyze(subject, spec, folder.path / FOLDER, log)


def settings_for(folder: RunDir, parts: list[str] | None, examples: int | None) -> AnalysisSpec:
    """The experiment's own `analysis:` settings when it has them, else every part with its defaults;
    `parts`: exactly those parts (the experiment's settings for them, else their defaults); `examples`
    sets both passes' example count."""
    given = ExperimentDir(folder.path.parent).experiment().get("analysis")
    spec = AnalysisSpec.model_validate(given if isinstance(given, dict) and given else True)
    if parts is not None:
        spec = AnalysisSpec.model_validate({"splits": spec.splits, **{p: getattr(spec, p) or True for p in parts}})
    return spec.for_examples(examples)


def analyze_runs(
    paths: list[Path], log: Log, *, parts: list[str] | None = None, examples: int | None = None, force: bool = False
) -> list[tuple[RunDir, dict[str, Any]]]:
    """Analyse each finished run (kept results reused); every input is checked before any work starts."""
    folders = [check_finished(path) for path in paths]
    if examples is not None and examples <= 0:
        raise InputError(f"--examples: expected a number of examples > 0, got {examples}")
    models = {_model_key(f.config().get("model")) for f in folders}
    if len(models) > 1:
        raise InputError(
            "analyze: the runs start from different base models ("
            + "; ".join(f"{f.path}: {_model_key(f.config().get('model'))}" for f in folders)
            + "); cross-run comparisons need one base model: analyse them in separate calls"
        )
    return [
        (folder, analyze_finished(folder.path, settings_for(folder, parts, examples), log, force=force))
        for folder in folders
    ]


def _model_key(model: Any) -> str:
    import json

    return model if isinstance(model, str) else json.dumps(model, sort_keys=True)


def format_summary(results: list[tuple[RunDir, dict[str, Any]]]) -> str:
    """The terminal table: one row per run with the headline numbers of each part."""
    from peftlab.analysis.run import mean_of
    from peftlab.report.render import aligned_text

    header = [
        "run",
        "method",
        "matrices",
        "‖ΔW‖/‖W0‖",
        "eff. rank",
        "k90",
        "intruders",
        "mean CKA",
        "mean JS",
        "seconds",
    ]
    rows = []
    for folder, result in results:
        weights = (result.get("weights") or {}).get("summary") or {}
        drift = _last_split((result.get("drift") or {}).get("splits"))
        attention = _last_split((result.get("attention") or {}).get("splits"))
        rows.append(
            [
                folder.name,
                str(result.get("method", "")),
                _fmt(weights.get("matrices"), 0),
                _fmt(weights.get("relative_change"), 4),
                _fmt(weights.get("effective_rank"), 2),
                _fmt(weights.get("k90"), 1),
                _fmt(weights.get("intruders"), 0),
                _fmt(mean_of((drift or {}).get("cka")), 4),
                _fmt(mean_of((attention or {}).get("js")), 5),
                _fmt((result.get("seconds") or {}).get("total"), 1),
            ]
        )
    errors = [
        f"{folder.name}: {part} failed: {why}" for folder, r in results for part, why in (r.get("errors") or {}).items()
    ]
    return aligned_text(header, rows, left=2) + ("\n" + "\n".join(errors) if errors else "")


def _last_split(splits: dict[str, Any] | None) -> dict[str, Any] | None:
    """The split the summary shows: test when present, else the first."""
    if not splits:
        return None
    return splits.get("test") or next(iter(splits.values()))


def _fmt(value: Any, digits: int) -> str:
    if not isinstance(value, int | float):
        return "—"
    return f"{value:.{digits}f}" if digits else f"{value:,.0f}"
