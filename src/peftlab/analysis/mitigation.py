"""Intruder-dimension mitigation (Shuttleworth et al. 2024) as a new run: `peftlab analyze RUN --reduce-intruders λ`.

PEFT's `reduce_intruder_dimension` does the work (it subtracts (1 − λ) of each intruder direction of
W0 + ΔW and refits a rank-r adapter); peftlab writes the result as a sibling run folder
`<run>-intruders-<λ>` (config, adapter, metrics on the run's evaluated splits, predictions), so the
report sets the mitigated adapter beside the original: what it costs in score, and — once `peftlab run`
scores forgetting sets on it — what it gives back. LoRA runs only (as PEFT).
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
    if folder.config().get("method") != "lora":
        raise InputError(
            f"{path}: --reduce-intruders works on LoRA runs (this run's method: {folder.config()['method']})"
        )
    if not 0 <= strength < 1:
        raise InputError(f"--reduce-intruders: expected λ in [0, 1) (the share of each intruder kept), got {strength}")
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    from peftlab.trained import load_run

    run = load_run(folder.path)
    counts: list[str] = []
    reduce_intruder_dimension(
        run.model,
        top_k=top_k,
        threshold_epsilon=epsilon,
        mitigation_lambda=strength,
        logging_sink=counts.append,
    )
    _make_default(run.model, "intruder_reduced")
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


def _make_default(model: Any, name: str) -> None:
    """Make the mitigated adapter the one saved as `default` (what load_run reads back)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            module.lora_A["default"].weight.data = module.lora_A[name].weight.data.clone()
            module.lora_B["default"].weight.data = module.lora_B[name].weight.data.clone()
    model.set_adapter("default")
    model.delete_adapter(name)


def _derived(folder: RunDir, strength: float, top_k: int, epsilon: float) -> dict[str, Any]:
    return {
        "from": folder.name,
        "how": "peft reduce_intruder_dimension",
        "mitigation_lambda": strength,
        "top_k": top_k,
        "threshold_epsilon": epsilon,
    }
