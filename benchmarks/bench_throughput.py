"""Training-step throughput of full FT, LoRA and (IA)3 in fp32 and bf16 autocast on this machine.

Model: all-MiniLM-L6-v2 (asset minilm-l6) when fetched, else a random BERT of the same shape.
Batch 32 x 64 tokens, fused AdamW (the Trainer's default), dropout as the engine trains it (fast
masks on the CPU, dropout.py); 2 warm-up steps, then the median of 5 timed steps.
Targets: bf16 autocast at least 1.2x fp32 where the CPU has native bf16 (AVX512-BF16/AMX) or on
CUDA; a LoRA step at most 0.75x a full fine-tuning step (the frozen weights need no gradient: about
2/3 of the work); an (IA)3 step no slower than full fine-tuning.
"""

from __future__ import annotations

import statistics
import time

import torch

from peftlab import assets
from peftlab.dropout import use_fast_dropout
from peftlab.engine import cpu_supports_bf16
from peftlab.methods import METHODS
from peftlab.models import load_tokenizer, resolve_model
from peftlab.tasks import TASKS

BATCH, SEQ, WARMUP, STEPS = 32, 64, 2, 5
MINILM = {"arch": "bert", "random_init": True, "base": "sentence-transformers/all-MiniLM-L6-v2"}


def build(method: str):
    spec = "asset:minilm-l6" if assets.is_fetched("minilm-l6") else MINILM
    source = resolve_model(spec)
    task = TASKS.get("classification")(labels=["a", "b", "c"])
    torch.manual_seed(0)
    model = task.build_model(source, load_tokenizer(source))
    model = METHODS.get(method)().apply(model, head_modules=task.head_modules(model), task_type=task.peft_task_type)
    use_fast_dropout(model)  # as engine.train does (train.fast_dropout's default)
    return model


def step_seconds(method: str, bf16: bool) -> float:
    model = build(method)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids = torch.randint(1000, 2000, (BATCH, SEQ))
    labels = torch.randint(0, 3, (BATCH,))
    times = []
    for i in range(WARMUP + STEPS):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> bool:
    results = {(m, p): step_seconds(m, p == "bf16") for m in ("full", "lora", "ia3") for p in ("fp32", "bf16")}
    print(f"{'method':<6} {'fp32 s/step':>12} {'bf16 s/step':>12} {'bf16 samples/s':>15} {'bf16 speed-up':>14}")
    for m in ("full", "lora", "ia3"):
        fp32, bf16 = results[(m, "fp32")], results[(m, "bf16")]
        print(f"{m:<6} {fp32:>12.3f} {bf16:>12.3f} {BATCH / bf16:>15.1f} {fp32 / bf16:>13.2f}x")
    ok = True
    if cpu_supports_bf16():
        speedup = results[("full", "fp32")] / results[("full", "bf16")]
        ok &= _target(f"bf16 >= 1.2x fp32 (full FT): {speedup:.2f}x", speedup >= 1.2)
    for m, limit in (("lora", 0.75), ("ia3", 1.0)):
        ratio = results[(m, "bf16")] / results[("full", "bf16")]
        ok &= _target(f"{m} step <= {limit:g}x full FT step (bf16): {ratio:.2f}x", ratio <= limit)
    return ok


def _target(text: str, met: bool) -> bool:
    print(f"  [{'met' if met else 'MISSED'}] {text}")
    return met


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
