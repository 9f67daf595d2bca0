"""The `peftlab` command: parse arguments, call one function per verb, map errors to exit codes.

Exit codes: 0 ok, 2 bad input or config (the message names the file, key or line), 1 a run failed
(its error is in its status.json; the other runs went on).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from peftlab.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_RUN_FAILED, InputError

# Verbs that validate their input before loading the heavy libraries (they call quiet_libraries
# themselves), so that a config error is reported in about a second, not after torch has loaded.
LIGHT_VERBS = ("run", "plan", "assets")


def quiet_libraries() -> None:
    """Keep library chatter (hub telemetry, advisory warnings) out of the terminal output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import logging
    import warnings

    # bitsandbytes (imported by PEFT) warns on every start that an optional hub-downloaded CPU kernel is
    # missing; it falls back to its own kernels, so the warning is noise here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars; peftlab prints progress itself

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def cmd_run(args: argparse.Namespace) -> int:
    from peftlab.config import load_experiment

    exp = load_experiment(args.experiment, args.set, args.only)  # light: config errors come back at once
    quiet_libraries()
    from peftlab.experiment import run_experiment

    fresh = args.fresh if args.fresh else args.fresh is not None  # [] (no names) = every changed run
    return run_experiment(exp, fresh=fresh, executor=args.executor, workers=args.workers, wait=args.wait)


def cmd_plan(args: argparse.Namespace) -> int:
    from peftlab.config import load_experiment

    exp = load_experiment(args.experiment, args.set, args.only)  # light: config errors come back at once
    quiet_libraries()
    from peftlab.plan import format_plan, plan_experiment

    rows = plan_experiment(exp, log=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps([{**vars(r), "trainable_pct": r.trainable_pct} for r in rows], indent=2))
    else:
        from peftlab.sweep import plan_note

        print(format_plan(rows) + (f"\n\n{plan_note(exp.sweep)}" if plan_note(exp.sweep) else ""))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from peftlab.report import build_report

    paths = build_report(Path(args.runs_dir))
    for kind in ("md", "html", "csv"):
        print(paths[kind])
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from peftlab.evaluation import evaluate_run

    metrics = evaluate_run(Path(args.run_dir), args.data, args.split, name=args.name)
    print(json.dumps(metrics, indent=2))
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from peftlab.evaluation import predict_run

    predict_run(Path(args.run_dir), args.input, output=args.output)
    return EXIT_OK


def cmd_probe(args: argparse.Namespace) -> int:
    from peftlab.probe import format_terminal, probe_runs

    result = probe_runs(
        [Path(p) for p in args.run_dirs], Path(args.examples), Path(args.output) if args.output else None
    )
    print(format_terminal(result))
    print(f"\nwritten to {result.output} (and {result.output.with_suffix('.jsonl').name})", file=sys.stderr)
    return EXIT_OK


def cmd_analyze(args: argparse.Namespace) -> int:
    from peftlab import engine
    from peftlab.analysis.finished import analyze_runs, format_summary

    engine.set_threads()
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    paths = [Path(p) for p in args.run_dirs]
    if args.reduce_intruders is not None:  # the mitigated runs are written first, then analysed with the rest
        from peftlab.analysis.mitigation import reduce_intruders

        paths += [reduce_intruders(p, args.reduce_intruders, log).path for p in paths]
    results = analyze_runs(paths, log, parts=args.parts, examples=args.examples, force=args.force)
    print(format_summary(results))
    if not args.no_report:
        from peftlab.report import build_report

        for experiment in dict.fromkeys(folder.path.parent for folder, _ in results):
            if (experiment / "experiment.yaml").exists():
                log(f"report: {build_report(experiment)['html']} (section 'Inside the model')")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from peftlab.export import export_run

    def note(message: str) -> None:  # notes on stderr, the folder alone on stdout (for scripts)
        print(message, file=sys.stderr)

    print(export_run(Path(args.run_dir), Path(args.output), merge=args.merge, force=args.force, log=note).path)
    return EXIT_OK


def cmd_assets(args: argparse.Namespace) -> int:
    from peftlab import assets

    if args.action == "list":
        for asset in assets.CATALOG.values():
            state = "fetched" if assets.is_fetched(asset.name) else "not fetched"
            print(f"{asset.name:<20} {asset.kind:<5} {state:<12} {asset.requirement:<36} {asset.description}")
        print(f"\ncache: {assets.cache_root()} (set PEFTLAB_CACHE to move it)")
        return EXIT_OK
    names = args.names or []
    if args.all:
        names = list(assets.CATALOG)
    if not names:
        raise InputError("assets fetch: name at least one asset (or --all); see `peftlab assets list`")
    for name in names:
        assets.get(name)  # every name is checked before anything is downloaded
    quiet_libraries()  # a model asset's conversion loads transformers
    for name in names:
        assets.fetch(name)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from peftlab import __version__

    parser = argparse.ArgumentParser(prog="peftlab", description="A lab bench for parameter-efficient fine-tuning.")
    parser.add_argument("--version", action="version", version=f"peftlab {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True)

    def experiment_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("experiment", help="the experiment YAML file")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a setting, e.g. --set train.epochs=1 (repeatable)",
        )
        p.add_argument("--only", nargs="+", metavar="RUN", help="only these runs (method entries)")

    p = sub.add_parser("run", help="train + evaluate every run of an experiment, then write the report")
    experiment_args(p)
    p.add_argument(
        "--fresh",
        nargs="*",
        metavar="RUN",
        default=None,
        help="move runs that exist with other settings aside (to <run>.replaced-<time>) and rerun them; "
        "with run names: move exactly those runs aside (e.g. a damaged one) and retrain them",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="if another `peftlab run` is writing this experiment, wait for it to finish instead of exiting",
    )
    p.add_argument(
        "--executor",
        choices=["process", "inline", "ray"],
        default=None,
        help="process (default): each run in its own worker process, so a crash stays in one run and "
        "peak memory is the run's own; inline: all runs in this process; ray: each run a Ray task "
        "(settings under `executor:` in the experiment file). Default: the file's executor.name",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="with --executor process: train up to N runs at once (the cores are split between them)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("plan", help="each run's method, trainable/total parameters and a memory estimate")
    experiment_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("report", help="(re)build report.md, report.html and results.csv from finished runs")
    p.add_argument("runs_dir", help="an experiment folder, runs/<experiment>")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("eval", help="score a trained run on other data (out of domain, hold-out)")
    p.add_argument("run_dir", help="a finished run, runs/<experiment>/<run>")
    p.add_argument("--data", required=True, help="a file or folder, asset:NAME, or a hub dataset id")
    p.add_argument("--split", help="which split of the data (default: test, or the only one)")
    p.add_argument("--name", help="name of the result folder under <run>/evals/ (default: from --data)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="predictions from a trained run")
    p.add_argument("run_dir", help="a finished run, runs/<experiment>/<run>")
    p.add_argument("--input", required=True, help="a json/jsonl/csv file, or - for text lines on stdin")
    p.add_argument("--output", help="write JSONL here instead of stdout")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("probe", help="the same custom examples through several trained runs, side by side")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished runs, runs/<experiment>/<run>")
    p.add_argument(
        "--examples", required=True, help="YAML or JSONL examples: the task's fields + optional expected, category"
    )
    p.add_argument("--output", help="the .md file to write (default: probe.md in the first run's experiment folder)")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser(
        "analyze", help="what training changed inside the model: weight spectra, intruders, drift, attention"
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished runs, runs/<experiment>/<run>")
    p.add_argument("--examples", type=int, metavar="N", help="examples per split for the drift and attention passes")
    p.add_argument(
        "--parts",
        nargs="+",
        choices=["weights", "drift", "attention"],
        help="only these parts (default: the experiment's `analysis:` settings, else all three)",
    )
    p.add_argument("--force", action="store_true", help="measure again even when a current analysis is kept")
    p.add_argument("--no-report", action="store_true", help="do not rebuild the experiments' reports afterwards")
    p.add_argument(
        "--reduce-intruders",
        type=float,
        metavar="LAMBDA",
        help="LoRA runs: also write <run>-intruders-LAMBDA, the adapter with each intruder dimension scaled to "
        "LAMBDA (PEFT's reduce_intruder_dimension; 0.75 is its default), evaluated on the run's splits",
    )
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("export", help="a finished run as a folder plain transformers / PEFT load, without peftlab")
    p.add_argument("run_dir", help="a finished run, runs/<experiment>/<run>")
    p.add_argument("--output", required=True, metavar="DIR", help="the folder to write (must not exist or be empty)")
    p.add_argument(
        "--merge",
        action="store_true",
        help="merge the adapter into the base weights and save a plain transformers model (QLoRA: into a "
        "full-precision base); without it: the adapter folder with a model card",
    )
    p.add_argument("--force", action="store_true", help="replace --output when it exists and is not empty")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("assets", help="offline models and datasets (list, fetch)")
    p.add_argument("action", choices=["list", "fetch"])
    p.add_argument("names", nargs="*", help="asset names (fetch)")
    p.add_argument("--all", action="store_true", help="fetch every asset")
    p.set_defaults(func=cmd_assets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verb not in LIGHT_VERBS:
        quiet_libraries()
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except InputError as exc:
        print(f"peftlab: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("peftlab: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_RUN_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
