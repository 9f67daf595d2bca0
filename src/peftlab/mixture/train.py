"""Training a mixture's gate on a mix of its experts' tasks.

A plain loop, not the Trainer: the Trainer takes one dataset with one collator and one output shape,
where a mixture trains on batches that each come from one task (a multiple-choice batch is
[batch, choices, seq], a QA batch carries start/end positions) and are scored by that task's head.
Batches of all tasks are interleaved in a seeded order, so every stretch of training sees every task
in proportion to its size; each step is one optimizer step of AdamW over the gate (and the experts'
LoRA matrices with train_experts), linear decay after warm-up, gradient norm clipped at 1.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset

from peftlab.mixture.model import Mixture
from peftlab.mixture.settings import MixtureTrain

Log = Callable[[str], None]


@dataclass
class TaskBatches:
    """One task's training rows (model inputs only) and the collator that pads them."""

    rows: Dataset
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]


def schedule(sizes: dict[str, int], batch_size: int, epochs: float, seed: int) -> list[list[tuple[str, list[int]]]]:
    """Per epoch, the (task, row indices) of each batch: each task's rows shuffled and cut into batches,
    the batches of all tasks in a shuffled order. A fractional last epoch keeps its first steps."""
    rng = random.Random(seed)
    per_epoch = sum(math.ceil(n / batch_size) for n in sizes.values())
    total = max(1, round(epochs * per_epoch))
    out: list[list[tuple[str, list[int]]]] = []
    while sum(len(e) for e in out) < total:
        batches = []
        for task, n in sizes.items():
            order = list(range(n))
            rng.shuffle(order)
            batches += [(task, order[i : i + batch_size]) for i in range(0, n, batch_size)]
        rng.shuffle(batches)
        out.append(batches[: total - sum(len(e) for e in out)])
    return out


def train_gate(
    mixture: Mixture, data: dict[str, TaskBatches], spec: MixtureTrain, precision: str, log: Log, label: str
) -> dict[str, Any]:
    """Train what the mixture leaves trainable; returns seconds, steps and one history row per epoch."""
    from transformers import get_linear_schedule_with_warmup, set_seed

    set_seed(spec.seed)
    params = [p for p in mixture.parameters() if p.requires_grad]
    epochs = schedule({k: len(v.rows) for k, v in data.items()}, spec.batch_size, spec.epochs, spec.seed)
    steps = sum(len(e) for e in epochs)
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(spec.warmup_ratio * steps), steps)
    views = {key: mixture.view(key) for key in data}
    device = next(mixture.parameters()).device
    history: list[dict[str, Any]] = []
    mixture.train()
    start = time.perf_counter()
    done = 0
    for number, batches in enumerate(epochs, start=1):
        began = time.perf_counter()
        losses: dict[str, list[float]] = {key: [] for key in data}
        for task, rows in batches:
            batch = data[task].collator([data[task].rows[i] for i in rows])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with _autocast(precision, device):
                loss = views[task](**batch).loss
            if not bool(torch.isfinite(loss.detach())):
                raise RuntimeError(
                    f"the gate's training loss became {float(loss)} on task {task}: lower mixtures.*.train.lr"
                )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses[task].append(float(loss.detach()))
            done += 1
        seconds = time.perf_counter() - began
        row = {
            "epoch": round(done / max(1, steps) * spec.epochs, 4),
            "step": done,
            "train_loss": _mean([x for v in losses.values() for x in v]),
            "task_loss": {k: _mean(v) for k, v in losses.items() if v},
            "epoch_seconds": round(seconds, 3),
        }
        history.append(row)
        per_task = ", ".join(f"{k} {v:.4f}" for k, v in row["task_loss"].items())
        loss = f"train loss {row['train_loss']:.4f} ({per_task})"
        log(f"[{label}] epoch {number}/{len(epochs)}  step {done}/{steps}  {loss}  ({seconds:.0f}s)")
    mixture.eval()
    return {
        "train_seconds": round(time.perf_counter() - start, 3),
        "steps": steps,
        "epochs": spec.epochs,
        "history": history,
    }


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 6) if values else float("nan")


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
