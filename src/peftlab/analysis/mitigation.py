"""Intruder-dimension mitigation (Shuttleworth et al. 2024) as a new run: `peftlab analyze RUN --reduce-intruders λ`.

PEFT's `reduce_intruder_dimension` does the work (it subtracts (1 − λ) of each intruder direction of
W0 + ΔW and refits a rank-r adapter); peftlab writes the result as a sibling run folder
`<run>-intruders-<λ>` (config, adapter, metrics on the run's evaluated splits, predictions), so the
report sets the mitigated adapter beside the original: what it costs in score (and, scored on a general
set with `peftlab eval`, what it gives back). The method does the reduction
(`Method.reduce_intruders`: LoRA's, as PEFT's function; other methods refuse it, exit 2).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftlab.analysis.finished import check_finished, examples_of
from peftlab.errors import InputError
from peftlab.store import RunDir, write_json, write_jsonl, write_yaml

Log = Callable[[str], None]


def reduce_intruders(path: Path, strength: float, log: Log, *, top_k: int = 10, epsilon: float = 0.5) -> RunDir:
    """Write `<run>-intruders-<λ>`: the run's LoRA with intruders scaled to λ, evaluated like the run."""
    folder = check_finished(path)
    if not 0 <= strength < 1:
        raise InputError(f"--reduce-intruders: expected λ in [0, 1) (the share of each intruder kept), got {strength}")
    from peftlab.trained import load_run

    run = load_run(folder.path)
    try:
        counts = run.method.reduce_intruders(run.model, strength, top_k, epsilon)
    except InputError as exc:
        raise InputError(f"{path}: --reduce-intruders: {exc}") from None
    target = RunDir(folder.path.parent / f"{folder.name}-intruders-{strength:g}")
    shutil.rmtree(target.path, ignore_errors=True)
    target.path.mkdir(parents=True)
    config = {**run.config, "run": target.name, "derived": _derived(folder, strength, top_k, epsilon)}
    write_yaml(target.config_file, config)
    run.method.save(run.model, target.adapter_dir)
    run.tokenizer.save_pretrained(target.adapter_dir)
    evaluation = {}
    for split, examples in examples_of(run).items():
        predictions = run.predict(examples)
        write_jsonl(target.predictions_dir / f"{split}.jsonl", predictions)
        evaluation[split] = run.task.score(predictions)
    original = folder.metrics()
    write_json(
        target.metrics_file,
        {
            **{k: original[k] for k in ("method", "settings", "task", "params", "train") if k in original},
            "run": target.name,
            "eval": evaluation,
            "derived": config["derived"],
            "intruder_log": counts,
        },
    )
    target.record_done(finished=time.strftime("%Y-%m-%dT%H:%M:%S"), train_seconds=0.0)
    reduced = sum(1 for line in counts if ": Intruders:" in line)
    log(
        f"[{target.name}] intruders reduced to {strength:g} in {reduced} of {len(counts) - 1} matrices; "
        f"written to {target.path}"
    )
    return target


def _derived(folder: RunDir, strength: float, top_k: int, epsilon: float) -> dict[str, Any]:
    return {
        "from": folder.name,
        "how": "peft reduce_intruder_dimension",
        "mitigation_lambda": strength,
        "top_k": top_k,
        "threshold_epsilon": epsilon,
    }
