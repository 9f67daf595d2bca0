"""Time to quality: peftlab's defaults against two Hugging Face Trainer scripts, on the same examples.

The quickstart's data and model (3,000 / 500 / 1,000 tweets of asset tweets-3way, all-MiniLM-L6-v2,
2 epochs, batch 32), full fine-tuning, LoRA (r=8, alpha 16, query/value) and (IA)3 (PEFT's
defaults), each trained three ways, one after another, each in its own process:

  script   the transformers-script protocol: a plain Trainer script written for this benchmark,
           every example padded to 128 tokens, fp32, one learning rate (5e-5) for every method,
           LoRA dropout 0.1
  tuned    what a competent user writes instead: the same script with bf16 autocast (where the
           hardware has it), dynamic padding, max length 64, `train_sampling_strategy=group_by_length`
           and peftlab's per-method learning rates and LoRA settings
  peftlab  `peftlab run` on configs/quickstart.yaml (its defaults; the whole command is timed too)

Printed per method and protocol: training seconds per epoch (evaluation excluded, as peftlab
counts it), validation accuracy after each epoch, test accuracy; then, per method, for peftlab
against each script: the time each needs to reach the other's final validation accuracy (within
1 point; "never" if it does not) and the ratio of epoch times.
Target, per method: peftlab's epoch no slower than the tuned script's, at a final validation
accuracy no more than 1 point below it.

It takes 20-30 minutes on 2 CPU cores (the padded fp32 script is most of it). Run it alone on a
quiet machine: `make bench` or `python benchmarks/run.py bench_time_to_quality`.
Sizes: BENCH_TTQ_TRAIN (3000), BENCH_TTQ_EPOCHS (2); BENCH_TTQ_PROTOCOLS (script,tuned,peftlab);
BENCH_TTQ_METHODS (full,lora,ia3); BENCH_TTQ_SEED (0: the training seed of every protocol).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
METHODS = tuple(os.environ.get("BENCH_TTQ_METHODS", "full,lora,ia3").split(","))
SCRIPT_LR = 5e-5
WITHIN = 0.01  # "reaches" = within 1 accuracy point


def sizes() -> dict[str, int]:
    return {
        "train": int(os.environ.get("BENCH_TTQ_TRAIN", 3000)),
        "epochs": int(os.environ.get("BENCH_TTQ_EPOCHS", 2)),
        "seed": int(os.environ.get("BENCH_TTQ_SEED", 0)),
    }


def protocols() -> list[str]:
    return os.environ.get("BENCH_TTQ_PROTOCOLS", "script,tuned,peftlab").split(",")


# --- the scripts (one process each) ------------------------------------------------------------


def examples() -> tuple[dict[str, Any], list[str], str]:
    """The quickstart's examples (peftlab's own seeded selection: every protocol sees the same ones),
    the label names and the model folder."""
    from peftlab.config import load_experiment
    from peftlab.experiment import prepare

    s = sizes()
    exp = load_experiment(ROOT / "configs" / "quickstart.yaml", [f"data.limits.train={s['train']}"])
    prep = prepare(exp.groups()[0], log=lambda message: None)
    assert prep.source.path is not None
    return prep.examples, list(prep.task.labels), prep.source.path


def script_run(protocol: str, method: str) -> dict[str, Any]:
    """Train one method with a plain Trainer script ('script' or 'tuned'); epoch times and accuracies."""
    import numpy as np
    import torch
    from datasets import Dataset
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from peftlab.engine import cpu_supports_bf16
    from peftlab.methods import METHODS as REGISTRY
    from peftlab.methods.lora import LoraSettings

    tuned = protocol == "tuned"
    seed = sizes()["seed"]
    data, labels, model_dir = examples()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(split: str) -> Dataset:
        rows = data[split]
        padding = {"max_length": 64} if tuned else {"max_length": 128, "padding": "max_length"}
        enc = tokenizer(list(rows["text"]), truncation=True, **padding)
        return Dataset.from_dict({**enc, "labels": [labels.index(label) for label in rows["label"]]})

    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
    if method == "lora":
        dropout = LoraSettings().dropout if tuned else 0.1  # the tuned script uses peftlab's LoRA settings
        config = LoraConfig(
            task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["query", "value"]
        )
        model = get_peft_model(model, config)
    elif method == "ia3":
        model = get_peft_model(model, IA3Config(task_type="SEQ_CLS"))
    bf16 = tuned and (torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_supports_bf16())
    times: list[float] = []

    class EpochTimer(TrainerCallback):
        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            times.append(time.perf_counter() - self.start)

    def accuracy(pred: Any) -> dict[str, float]:
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            num_train_epochs=sizes()["epochs"],
            per_device_train_batch_size=32,
            per_device_eval_batch_size=64,
            learning_rate=REGISTRY.get(method).default_lr if tuned else SCRIPT_LR,
            eval_strategy="epoch",
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            seed=seed,
            bf16=bf16,
            use_cpu=not torch.cuda.is_available(),
            train_sampling_strategy="group_by_length" if tuned else "random",
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=encode("train"),
            eval_dataset=encode("validation"),
            data_collator=DataCollatorWithPadding(tokenizer) if tuned else None,
            compute_metrics=accuracy,
            callbacks=[EpochTimer()],
        )
        trainer.train()
        val = [e["eval_accuracy"] for e in trainer.state.log_history if "eval_accuracy" in e]
        test = trainer.predict(encode("test")).metrics["test_accuracy"]
    return {"epoch_seconds": times, "val": val, "test": test, "precision": "bf16" if bf16 else "fp32"}


def peftlab_runs() -> tuple[dict[str, dict[str, Any]], float]:
    """`peftlab run configs/quickstart.yaml` (all three methods) in a scratch folder; per method the
    epoch times and accuracies from its history.jsonl and metrics.json, and the command's wall time."""
    from peftlab.store import ExperimentDir

    s = sizes()
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "peftlab",
                "run",
                str(ROOT / "configs" / "quickstart.yaml"),
                "--set",
                f"output_dir={out}",
                "--set",
                f"data.limits.train={s['train']}",
                "--set",
                f"train.epochs={s['epochs']}",
                "--set",
                f"train.seed={s['seed']}",
                "--only",
                *METHODS,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - start
        results = {}
        for method in METHODS:
            run = ExperimentDir(Path(out) / "quickstart").run(method)
            epochs, metrics = run.history("epoch"), run.metrics()
            results[method] = {
                "epoch_seconds": [r["epoch_seconds"] for r in epochs],
                "val": [r["eval_accuracy"] for r in epochs],
                "test": metrics["eval"]["test"]["accuracy"],
                "precision": metrics["precision"],
                "tokens_per_second": metrics["train"]["tokens_per_second"],  # real (non-padding) tokens
            }
    return results, wall


def in_process(protocol: str, method: str) -> dict[str, Any]:
    """Run one script protocol in a fresh process (no memory or thread state shared with the others)."""
    done = subprocess.run(
        [sys.executable, __file__, "--one", protocol, method], check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the comparison ----------------------------------------------------------------------------


def time_to_reach(result: dict[str, Any], target: float) -> float | None:
    """Training seconds until the first epoch whose validation accuracy is within 1 point of target."""
    spent = 0.0
    for seconds, accuracy in zip(result["epoch_seconds"], result["val"], strict=True):
        spent += seconds
        if accuracy >= target - WITHIN:
            return spent
    return None


def mean_epoch(result: dict[str, Any]) -> float:
    return sum(result["epoch_seconds"]) / len(result["epoch_seconds"])


def _fmt_time(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.0f} s"


def report(results: dict[str, dict[str, dict[str, Any]]], wall: float | None) -> bool:
    print(f"{'method':<6} {'protocol':<8} {'precision':<9} {'s/epoch':>8}  {'val acc by epoch':<22} {'test acc':>8}")
    for method in METHODS:
        for protocol, result in results.get(method, {}).items():
            val = " ".join(f"{v:.3f}" for v in result["val"])
            print(
                f"{method:<6} {protocol:<8} {result['precision']:<9} {mean_epoch(result):>8.1f}  {val:<22} "
                f"{result['test']:>8.3f}"
            )
    if wall is not None:
        print(f"peftlab run configs/quickstart.yaml, end to end: {wall:.0f} s ({wall / 60:.1f} min)")
        throughput = {m: r["peftlab"]["tokens_per_second"] for m, r in results.items() if "peftlab" in r}
        print(
            "peftlab training throughput, real tokens/s: " + ", ".join(f"{m} {t:,.0f}" for m, t in throughput.items())
        )
    ok = True
    for method in METHODS:
        ours = results.get(method, {}).get("peftlab")
        for other in ("tuned", "script"):
            theirs = results.get(method, {}).get(other)
            if ours is None or theirs is None:
                continue
            ratio = mean_epoch(ours) / mean_epoch(theirs)
            print(
                f"{method}: peftlab vs {other}: epoch {ratio:.2f}x; peftlab reaches {other}'s final val acc "
                f"{theirs['val'][-1]:.3f} in {_fmt_time(time_to_reach(ours, theirs['val'][-1]))}, {other} reaches "
                f"peftlab's {ours['val'][-1]:.3f} in {_fmt_time(time_to_reach(theirs, ours['val'][-1]))}"
            )
            if other == "tuned":
                met = ratio <= 1.0 and ours["val"][-1] >= theirs["val"][-1] - WITHIN
                print(f"  [{'met' if met else 'MISSED'}] {method}: peftlab epoch <= tuned script's at >= its accuracy")
                ok &= met
    return ok


def main() -> bool:
    from peftlab import assets

    missing = [name for name in ("minilm-l6", "tweets-3way") if not assets.is_fetched(name)]
    if missing:
        print(f"skipped: assets not fetched ({', '.join(missing)}); `make assets` fetches them")
        return True
    chosen = protocols()
    print(f"sizes {sizes()}, protocols {chosen}; each method trains in its own process, one after another")
    results: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in METHODS}
    wall = None
    if "peftlab" in chosen:
        runs, wall = peftlab_runs()
        for method, result in runs.items():
            results[method]["peftlab"] = result
    for protocol in ("tuned", "script"):
        if protocol in chosen:
            for method in METHODS:
                results[method][protocol] = in_process(protocol, method)
                print(f"  {protocol} {method}: {mean_epoch(results[method][protocol]):.1f} s/epoch", flush=True)
    return report(results, wall)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        from peftlab.cli import quiet_libraries

        quiet_libraries()
        print(json.dumps(script_run(sys.argv[2], sys.argv[3])))
    else:
        raise SystemExit(0 if main() else 1)
