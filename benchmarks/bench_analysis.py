"""How long one run's analysis takes (weights, drift, attention), with the default settings.

Targets (issue 12): all of it under 30 s for minilm-l6 and under 2 minutes for smollm2-135m per run, on
a 2-core CPU. Measured on a LoRA run (r 8 on the architecture's default targets, adapters moved off
their zero start as training would) and on full fine-tuning (every weight moved), each against its
base model, on 64 (drift) and 32 (attention) real tweets per split, two splits, as `analysis: true`.
SmolLM2 comes from its asset, else a random Llama of its shape (said so below).
"""

from __future__ import annotations

import time

import torch
from bench_generation import SMOLLM2_SHAPE  # benchmarks/ is on the path: run.py and `python benchmarks/...`

from peftlab import assets
from peftlab.analysis.run import Subject, analyze
from peftlab.analysis.settings import AnalysisSpec
from peftlab.data.loading import load_splits
from peftlab.methods import METHODS
from peftlab.models import load_config, load_tokenizer, resolve_model
from peftlab.tasks import TASKS

TARGETS = {"minilm-l6": 30.0, "smollm2-135m": 120.0}


def _source(name: str) -> tuple[object, str]:
    try:
        assets.ensure(name, log=lambda _: None)
        return resolve_model(f"asset:{name}"), f"asset:{name}"
    except Exception as exc:  # offline without the asset: the same shape with random weights
        print(f"  asset {name} unavailable ({type(exc).__name__}): a random model of its shape")
        shape = {"arch": "llama", "random_init": True, "config": SMOLLM2_SHAPE}
        return resolve_model(shape), "random llama (SmolLM2 shape)"


def _task(name: str):
    if name == "smollm2-135m":
        verbalizers = {"negative": "negative", "neutral": "neutral", "positive": "positive"}
        return TASKS.get("causal_classification")(prompt="Tweet: {text}\nSentiment:", verbalizers=verbalizers)
    return TASKS.get("classification")()


def _subject(name: str, method_name: str) -> Subject:
    from peftlab.config import DataSpec

    source, where = _source(name)
    tokenizer = load_tokenizer(source)
    task = _task(name)
    data = DataSpec(source="asset:tweets-3way", limits={"train": 300, "validation": 100, "test": 100}, max_length=64)
    examples = task.prepare(load_splits(data, None, ("train", "validation", "test")), "tweets-3way")
    method = METHODS.get(method_name)(**({"r": 8} if method_name == "lora" else {}))
    torch.manual_seed(0)
    model = method.apply(task.build_model(source, tokenizer), head_modules=[], task_type=task.peft_task_type)
    with torch.no_grad():  # as if trained: LoRA's B off zero, every full-FT weight moved a little
        for pname, param in model.named_parameters():
            if method_name == "full" or "lora_B" in pname:
                param.add_(1e-3 * torch.randn_like(param))

    def build_base():
        torch.manual_seed(0)
        return task.build_model(source, tokenizer)

    print(f"  {name} ({where}), {method_name}")
    return Subject(
        name,
        method_name,
        method,
        model.eval(),
        build_base,
        load_config(source)[0].model_type,
        task,
        tokenizer,
        64,
        {"validation": examples["validation"], "test": examples["test"]},
        "bench",
    )


def main() -> bool:
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    ok = True
    spec = AnalysisSpec.model_validate(True)
    import tempfile
    from pathlib import Path

    for name, limit in TARGETS.items():
        for method in ("lora", "full"):
            subject = _subject(name, method)
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as out:
                result = analyze(subject, spec, Path(out), log=lambda _: None)
            total = time.perf_counter() - started
            parts = ", ".join(f"{k} {v:.1f}s" for k, v in result["seconds"].items() if k != "total")
            met = total < limit and not result["errors"]
            ok = ok and met
            errors = f" {result['errors']}" if result["errors"] else ""
            print(
                f"  {name} {method}: {total:.1f}s ({parts}); {result['weights']['summary']['matrices']} matrices; "
                f"target < {limit:.0f}s: {'met' if met else 'MISSED'}{errors}"
            )
    return ok


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
