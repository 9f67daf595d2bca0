"""Peak memory and training-step time of LoRA vs QLoRA (and (IA)3) on the same causal LM.

Model: SmolLM2-135M-Instruct (asset smollm2-135m) when fetched, else a random Llama of the same
shape. Each configuration trains in its own process (a process's peak memory is its own), on the
causal_classification layout: BATCH rows of SEQ tokens, the loss on the last token only, logits
for the last positions only. AdamW; 1 warm-up step, then the median of STEPS timed steps.

  lora       LoRA r=8 on every linear layer of the blocks, fp32 base weights
  lora+ckpt  the same with gradient checkpointing (QLoRA always checkpoints: this separates the two)
  qlora      LoRA r=8 on NF4 4-bit base weights, double quantization, bf16 compute where supported
  ia3        (IA)3 on q, k, o, gate, up, down (down as the feed-forward module)

Memory: on CUDA the allocator's peak during the timed steps plus what the model holds; on the CPU
the process's resident memory after loading the model, and its peak resident memory during the
steps (VmHWM, reset after loading: the same measure a run's metrics.json reports). Step times on a
CPU shared with other jobs vary; the CPU seconds per step are reported beside the wall time.
Target: QLoRA's training peak below LoRA's (4-bit weights are the point of QLoRA).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import psutil
import torch

BATCH, SEQ, WARMUP, STEPS = 8, 128, 1, 3
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "lora": ("lora", {"r": 8, "target_modules": LINEAR}, False),
    "lora+ckpt": ("lora", {"r": 8, "target_modules": LINEAR}, True),
    "qlora": ("lora", {"r": 8, "target_modules": LINEAR, "quantize": "nf4"}, False),
    "ia3": (
        "ia3",
        {
            "target_modules": ["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "feedforward_modules": ["down_proj"],
        },
        False,
    ),
}
SMOLLM2 = {"arch": "llama", "random_init": True, "base": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def build(name: str):
    from peftlab import assets
    from peftlab.methods import METHODS
    from peftlab.models import load_tokenizer, resolve_model
    from peftlab.tasks import TASKS

    method_name, settings, checkpointing = CONFIGS[name]
    source = resolve_model("asset:smollm2-135m" if assets.is_fetched("smollm2-135m") else SMOLLM2)
    task = TASKS.get("causal_classification")(labels=["negative", "neutral", "positive"])
    method = METHODS.get(method_name)(**settings)
    torch.manual_seed(0)
    model = task.build_model(source, load_tokenizer(source), **method.load_kwargs())
    model = method.apply(model, head_modules=task.head_modules(model), task_type=task.peft_task_type)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), source.describe()


def measure(name: str) -> dict:
    """Runs in a child process: build, then time the steps under peftlab's own peak-memory meter."""
    from peftlab.engine import PeakMemory, _release_freed_memory, resolve_precision
    from peftlab.methods import count_parameters

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, model_name = build(name)
    if device == "cpu":
        _release_freed_memory()
    loaded = psutil.Process().memory_info().rss / 2**20 if device == "cpu" else torch.cuda.memory_allocated() / 2**20
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(100, 40000, (BATCH, SEQ), device=device)
    labels = torch.full((BATCH, 2), -100, device=device)
    labels[:, -1] = ids[:, -1]
    bf16 = resolve_precision("auto") == "bf16"
    walls, cpus = [], []
    with PeakMemory() as peak:
        for step in range(WARMUP + STEPS):
            wall, cpu = time.perf_counter(), time.process_time()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, logits_to_keep=2).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if device == "cuda":
                torch.cuda.synchronize()
            if step >= WARMUP:
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
    trainable, total = count_parameters(model)
    return {
        "config": name,
        "model": model_name,
        "device": device,
        "bf16": bf16,
        "trainable": trainable,
        "total": total,
        "loaded_mib": round(loaded, 1),
        "train_peak_mib": peak.mib,
        "memory_kind": peak.kind,
        "step_seconds": round(statistics.median(walls), 3),
        "cpu_seconds_per_step": round(statistics.median(cpus), 3),
        "loss": round(float(loss), 4),
    }


def main() -> bool:
    results = []
    for name in CONFIGS:
        proc = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            return False
        results.append(json.loads(lines[-1]))
    first = results[0]
    print(f"model: {first['model']} on {first['device']}; batch {BATCH} x {SEQ} tokens; bf16 autocast: {first['bf16']}")
    print(
        f"{'config':<10} {'trainable':>10} {'loaded MiB':>11} {'train peak MiB':>15} {'s/step':>8} {'CPU s/step':>11}"
    )
    for r in results:
        print(
            f"{r['config']:<10} {r['trainable']:>10,} {r['loaded_mib']:>11.0f} {r['train_peak_mib']:>15.0f} "
            f"{r['step_seconds']:>8.2f} {r['cpu_seconds_per_step']:>11.2f}"
        )
    by = {r["config"]: r for r in results}
    met = by["qlora"]["train_peak_mib"] < by["lora"]["train_peak_mib"]
    print(
        f"  [{'met' if met else 'MISSED'}] QLoRA training peak below LoRA's: "
        f"{by['qlora']['train_peak_mib']:.0f} vs {by['lora']['train_peak_mib']:.0f} MiB"
    )
    return met


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        from peftlab.cli import quiet_libraries

        quiet_libraries()
        print(json.dumps(measure(sys.argv[2])))
        raise SystemExit(0)
    raise SystemExit(0 if main() else 1)
