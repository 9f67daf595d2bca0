"""Training and evaluation: the HF Trainer plus one callback; no task- or method-specific code.

Why the Trainer: it brings checkpoint/resume, gradient accumulation, mixed precision and
multi-GPU (accelerate, torchrun, DeepSpeed) with no overhead measured here. peftlab adds what a
comparison needs: the training loss every few optimizer steps and, per epoch, train and validation
loss with wall time (`history.jsonl`), training time without evaluation, throughput in samples/s and
real (non-padding) tokens/s, and peak memory. Experiment trackers (`train.report_to`: TensorBoard,
MLflow, W&B) are the Trainer's own integrations, pointed at the run folder (`tracking.py`).

Precision `auto` is bf16 autocast where the hardware runs it natively (CUDA with bf16 support, a
CPU with AVX512-BF16 or AMX), fp16 on older GPUs, else fp32. The choice is recorded in metrics.json.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import nn

from peftlab import distributed, faults, integrity, tracking
from peftlab.config import TrainSpec
from peftlab.dropout import use_fast_dropout
from peftlab.store import CHECKPOINT_RECORD, EPOCH, STEP, RunDir, epoch_rows, follow_umask, write_json, write_jsonl

Log = Callable[[str], None]


# --- hardware, precision, memory -------------------------------------------------------------


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (AVX512-BF16 or AMX), where autocast pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_precision(requested: str) -> str:
    """'auto' -> bf16 | fp16 | fp32 for this machine; explicit requests are checked."""
    cuda = torch.cuda.is_available()
    bf16_ok = torch.cuda.is_bf16_supported() if cuda else cpu_supports_bf16()
    if requested == "auto":
        return "bf16" if bf16_ok else ("fp16" if cuda else "fp32")
    if requested == "fp16" and not cuda:
        from peftlab.errors import InputError

        raise InputError("train.precision: fp16 needs a CUDA GPU; use bf16 or fp32 (or auto) on the CPU")
    return requested


def hardware() -> dict[str, Any]:
    """What the run ran on, for the report's time and memory tables."""
    info: dict[str, Any] = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    import accelerate
    import datasets
    import peft
    import transformers

    import peftlab

    return {
        "peftlab": peftlab.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
    }


class PeakMemory:
    """Peak memory while the block runs, in MiB.

    CUDA: the allocator's peak (torch.cuda.max_memory_allocated). CPU on Linux: the process's
    peak resident set (VmHWM), reset at the start by writing 5 to /proc/self/clear_refs, so it is the
    peak of this block, not of the process. Elsewhere: resource's ru_maxrss (process lifetime).
    """

    def __init__(self) -> None:
        self.kind = "cuda_max_allocated" if torch.cuda.is_available() else "cpu_peak_rss"
        self.mib: float | None = None

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        else:
            _release_freed_memory()
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.kind = "cpu_max_rss_process"
        return self

    def __exit__(self, *exc: object) -> None:
        self.mib = round(self.read(), 1)

    def read(self) -> float:
        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
        with contextlib.suppress(OSError, AttributeError):
            match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
            if match:
                return int(match.group(1)) / 1024
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale / 1024


def _release_freed_memory() -> None:
    """Hand memory that was freed before the block (e.g. fp32 copies while loading a 4-bit model) back
    to the OS, so that the peak resident memory measured from here on is the block's own (glibc only)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# --- the Trainer -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Monitor:
    """The validation metric early stopping watches (a key of the task's scores, or 'loss')."""

    metric: str
    greater_is_better: bool


def steps_per_epoch(spec: TrainSpec, n_train: int, processes: int = 1) -> int:
    """Optimizer steps in an epoch: the global batch is batch_size x grad_accum x processes."""
    return max(1, math.ceil(n_train / (spec.batch_size * spec.grad_accum * processes)))


def log_steps(spec: TrainSpec, n_train: int) -> int:
    """Optimizer steps between two training-loss logs: `train.log_every`, or for `auto` about 20 an epoch."""
    if spec.log_every != "auto":
        return int(spec.log_every)
    return max(1, steps_per_epoch(spec, n_train, distributed.world_size()) // 20)


def training_arguments(
    spec: TrainSpec,
    out_dir: Path,
    *,
    has_eval: bool,
    precision: str,
    quiet: bool = False,
    monitor: Monitor | None = None,
    logging_steps: int = 1,
    run_name: str | None = None,
    report_to: Sequence[str] = (),
) -> Any:
    """TrainingArguments for one run (eval each epoch, checkpoint each epoch or N steps, keep one).

    The training loss is logged every `logging_steps` optimizer steps (and at every epoch end and
    checkpoint, see RunCallback), to history.jsonl and to the `report_to` trackers under `run_name`.
    With a monitor (early stopping), the best epoch's weights are restored at the end of training
    (`load_best_model_at_end`), so the run is evaluated and saved with them.
    """
    from transformers import TrainingArguments

    per_steps = isinstance(spec.checkpoint_every, int)
    best = (
        {
            "load_best_model_at_end": True,
            "metric_for_best_model": monitor.metric,
            "greater_is_better": monitor.greater_is_better,
        }
        if monitor is not None and has_eval
        else {}
    )
    return TrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps or -1,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.eval_batch_size or 2 * spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum,
        learning_rate=float(spec.lr),
        weight_decay=spec.weight_decay,
        warmup_steps=spec.warmup_ratio,  # a float < 1 is a fraction of the training steps
        lr_scheduler_type=spec.scheduler,
        max_grad_norm=spec.max_grad_norm,
        seed=spec.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=spec.gradient_checkpointing,
        # Batches of similar lengths waste little compute on padding (dynamic padding pads to the longest).
        train_sampling_strategy="group_by_length" if spec.group_by_length else "random",
        eval_strategy="epoch" if has_eval else "no",
        logging_strategy="steps",
        logging_steps=logging_steps,
        run_name=run_name,
        save_strategy="steps" if per_steps else "epoch",
        save_steps=spec.checkpoint_every if per_steps else 500,
        # Two: while a new checkpoint is written, the previous complete one is still there to fall
        # back to (a checkpoint is complete when its record is written, see on_save below).
        save_total_limit=2,
        report_to=list(report_to),
        disable_tqdm=quiet or not sys.stderr.isatty(),
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        **best,
    )


def history_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """history.jsonl's rows from the Trainer's log, in training order.

    A step row (`kind: step`) per training-loss log: step, epoch (fractional), the mean training loss
    since the log before, lr, grad_norm. An epoch row (`kind: epoch`) per epoch, after its step rows:
    the epoch's mean training loss (the step logs' losses weighted by the steps each covers: every
    optimizer step of the epoch counted once), val loss, the task's validation metrics (eval_<name>),
    lr and grad_norm at the epoch's last step, epoch and wall seconds, tokens seen.
    """
    entries = [e for e in log_history if "epoch" in e and "train_loss" not in e]  # train_loss: the final summary
    ends = sorted({_epoch_key(e) for e in entries if "loss" not in e})  # epoch timings and evaluations
    rows: list[dict[str, Any]] = []
    epochs: dict[float, dict[str, Any]] = {}
    windows: dict[float, list[tuple[dict[str, Any], int]]] = {}
    last_step = 0
    for entry in entries:
        key = _epoch_key(entry)
        if "loss" in entry:
            rows.append(_step_row(entry))
            steps = entry.get("loss_steps") or max(1, int(entry.get("step", 0)) - last_step)
            last_step = int(entry.get("step", last_step))
            end = next((k for k in ends if k >= key), None)  # the epoch this loss window belongs to
            if end is not None:
                windows.setdefault(end, []).append((entry, steps))
            continue
        if key not in epochs:
            epochs[key] = {"kind": EPOCH, "epoch": key}
            rows.append(epochs[key])
        row = epochs[key]
        row["step"] = entry.get("step", row.get("step"))
        for src, dst in (
            ("eval_loss", "val_loss"),
            ("epoch_seconds", "epoch_seconds"),
            ("wall_seconds", "wall_seconds"),
            ("tokens_seen", "tokens_seen"),
        ):
            if src in entry:
                row[dst] = entry[src]
        row.update(
            {
                k: v
                for k, v in entry.items()
                if k.startswith("eval_") and k != "eval_loss" and not k.endswith(("_runtime", "_per_second"))
            }
        )
    for key, row in epochs.items():
        if key in windows:
            row.update(_epoch_loss(windows[key]))
    kinds = {STEP: 0, EPOCH: 1}  # an epoch row after the step rows of its last step
    return sorted(rows, key=lambda r: (r.get("step") or 0, kinds[r["kind"]]))


def _epoch_key(entry: dict[str, Any]) -> float:
    return round(float(entry["epoch"]), 4)


def _step_row(entry: dict[str, Any]) -> dict[str, Any]:
    row = {"kind": STEP, "step": entry.get("step"), "epoch": _epoch_key(entry), "train_loss": entry["loss"]}
    for src, dst in (("learning_rate", "lr"), ("grad_norm", "grad_norm")):
        if src in entry:
            row[dst] = entry[src]
    return row


def _epoch_loss(window: list[tuple[dict[str, Any], int]]) -> dict[str, Any]:
    """The epoch's mean training loss from its step logs (each the mean over the steps it covers), and
    the lr and grad_norm of its last log."""
    total = sum(steps for _, steps in window)
    out: dict[str, Any] = {"train_loss": sum(e["loss"] * steps for e, steps in window) / total}
    last = window[-1][0]
    for src, dst in (("learning_rate", "lr"), ("grad_norm", "grad_norm")):
        if src in last:
            out[dst] = last[src]
    return out


def _callback_class() -> type:
    from transformers import TrainerCallback

    class RunCallback(TrainerCallback):
        """Times epochs (training only), writes history.jsonl, prints progress once an epoch.

        The training loss is logged every `logging_steps` steps and also at the last step of every epoch
        and at every checkpoint, so that no log window spans two epochs or a resume, and each log entry
        records how many steps its loss is the mean of (`loss_steps`): the epoch's mean is then exact.
        """

        def __init__(self, history_file: Path, log: Log, label: str) -> None:
            self.history_file = history_file
            self.log = log
            self.label = label
            self.epoch_start = 0.0
            self.train_start = 0.0
            self.last_logged = 0
            self.written = -math.inf

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.train_start = time.perf_counter() - self._wall_before(state)
            self.last_logged = state.global_step  # where the Trainer's first loss window starts (0, or a resume)

        @staticmethod
        def _wall_before(state: Any) -> float:
            """Wall time already spent before a resume (from the restored history)."""
            walls = [e["wall_seconds"] for e in state.log_history if "wall_seconds" in e]
            return walls[-1] if walls else 0.0

        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.epoch_start = time.perf_counter()

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            # Appended to the Trainer's own log so that it is saved in, and restored from, checkpoints.
            state.log_history.append(
                {
                    "epoch": state.epoch,
                    "step": state.global_step,
                    "epoch_seconds": round(time.perf_counter() - self.epoch_start, 3),
                    "wall_seconds": round(time.perf_counter() - self.train_start, 3),
                    "tokens_seen": int(state.num_input_tokens_seen),
                }
            )
            control.should_log = True  # normally logged at the step's end already (then a no-op)
            self._write(state)
            if args.eval_strategy == "no":
                self._print(state)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            entry = state.log_history[-1] if state.log_history else {}
            if logs and "loss" in logs and entry.get("loss") == logs["loss"]:
                entry["loss_steps"] = state.global_step - self.last_logged  # the steps this mean covers
                self.last_logged = state.global_step
            # Step logs rewrite the file at most every 10 s (log_every: 1 on a long run would otherwise
            # rewrite it at every step); it is rebuilt from the Trainer's state, which checkpoints keep.
            if not (logs and "loss" in logs) or time.perf_counter() - self.written >= 10:
                self._write(state)

        def _write(self, state: Any) -> None:
            write_jsonl(self.history_file, history_rows(state.log_history))
            self.written = time.perf_counter()

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            """Mark the checkpoint just written complete: a record of its files, written last."""
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            distributed.barrier()  # every rank has written its part (its RNG state) before rank 0 records
            if folder.is_dir() and args.should_save:  # rank 0 only (one process per run: always)
                faults.point("checkpoint")  # kill point: the Trainer wrote the files, the record is not there
                follow_umask(folder)
                write_json(folder / CHECKPOINT_RECORD, integrity.record(folder, [folder]))

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            faults.point("train_step")
            # Runs after the Trainer's own flow callback, which has decided on saving and stopping.
            epoch_ends = state.epoch is not None and abs(state.epoch - round(state.epoch)) < 1e-9
            if epoch_ends or control.should_save or control.should_training_stop:
                control.should_log = True

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kw: Any) -> None:
            self._write(state)
            self._print(state)

        def _print(self, state: Any) -> None:
            rows = epoch_rows(history_rows(state.log_history))
            if not rows:
                return
            row = rows[-1]
            val = f"  val loss {row['val_loss']:.4f}" if "val_loss" in row else ""
            secs = row.get("epoch_seconds")
            timing = f"  ({secs:.0f}s)" if secs is not None else ""
            train_loss = f"  train loss {row['train_loss']:.4f}" if "train_loss" in row else ""
            self.log(
                f"[{self.label}] epoch {row['epoch']:g}/{state.num_train_epochs}  step {row['step']}"
                f"{train_loss}{val}{timing}"
            )

    return RunCallback


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: the run stops at once (its status says where)."""


def _stop_on_non_finite_loss(model: nn.Module) -> Any:
    """A forward hook that raises NonFiniteLoss as soon as a training forward pass returns a NaN or
    infinite loss (the Trainer logs losses every few steps, and replaces a NaN by the mean so far; a
    diverged run would waste the rest of its training)."""

    def check(module: nn.Module, args: Any, output: Any) -> None:
        if module.training:
            faults.point("forward")  # kill point: inside a training step (forward done, no backward yet)
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if module.training and loss is not None and not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteLoss(f"the training loss became {float(loss.detach().float().mean())}")

    return model.register_forward_hook(check)


@dataclass
class TrainResult:
    """What training measured."""

    train_seconds: float
    wall_seconds: float
    epochs_run: float
    steps: int
    samples_per_second: float
    tokens_per_second: float
    tokens_seen: int
    peak_memory_mib: float | None
    memory_kind: str
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: str | None = None
    stopped_early: bool = False
    best_epoch: float | None = None
    best_metric: float | None = None
    processes: int = 1  # data-parallel processes (distributed.py): the global batch is processes x batch_size


def train(
    model: nn.Module,
    train_set: Dataset,
    eval_set: Dataset | None,
    collator: Callable,
    spec: TrainSpec,
    run: RunDir,
    *,
    precision: str,
    log: Log = print,
    label: str = "",
    validation_metrics: Callable[[Any], dict[str, float]] | None = None,
    monitor: Monitor | None = None,
    reduce: Callable[[Any, Any], Any] | None = None,
) -> TrainResult:
    """Train (resuming from the run's last checkpoint if there is one) and measure.

    validation_metrics(raw outputs) -> scalar metrics is called after each epoch's evaluation (the
    task's own metrics, logged to history.jsonl as eval_<name>); `reduce` shrinks each evaluation
    batch's raw outputs first (as in `predict`). With a monitor, training stops
    after `spec.early_stopping.patience` epochs without improvement and the best epoch is kept.
    The `spec.report_to` trackers log the run under `label` (default: the run folder's name), with the
    run's config.yaml as its settings.
    """
    from transformers import EarlyStoppingCallback

    # Several processes (distributed.py): rank 0 picks the checkpoint and owns the checkpoint folder.
    resume = distributed.agree(lambda: run.latest_checkpoint(lambda message: log(f"[{label}] {message}")))
    if resume is not None:
        log(f"[{label}] resuming from {resume.name}")
    has_eval = eval_set is not None
    args = training_arguments(
        spec,
        distributed.agree(lambda: run.checkpoints_dir),
        has_eval=has_eval,
        precision=precision,
        monitor=monitor,
        logging_steps=log_steps(spec, len(train_set)),
        run_name=label or run.name,
        report_to=spec.report_to,
    )
    if spec.fast_dropout:
        use_fast_dropout(model)
    callbacks: list[Any] = [_callback_class()(run.history_file, log, label)]
    if monitor is not None and has_eval and spec.early_stopping is not None:
        callbacks.append(EarlyStoppingCallback(spec.early_stopping.patience, spec.early_stopping.min_delta))
    # Evaluated sorted by length (little padding); the task's metrics see the outputs in eval_set's order.
    ordered_eval, restore = by_length(eval_set) if eval_set is not None else (None, None)
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=ordered_eval,
        data_collator=collator,
        callbacks=callbacks,
        compute_metrics=(
            (lambda p: validation_metrics(restore(p.predictions))) if validation_metrics and has_eval else None
        ),
        preprocess_logits_for_metrics=reduce if validation_metrics and has_eval else None,
    )
    _quiet(trainer)
    settings = _run_settings(run, spec) if spec.report_to else {}
    trackers = tracking.session(trainer, spec.report_to, run.path, settings, lambda m: log(f"[{label}] {m}"))
    hook = _stop_on_non_finite_loss(model)
    try:
        with trackers, PeakMemory() as memory:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except NonFiniteLoss as exc:
        lr = trainer.lr_scheduler.get_last_lr()[0] if trainer.lr_scheduler is not None else spec.lr
        raise NonFiniteLoss(
            f"{exc} at step {trainer.state.global_step + 1} (epoch {float(trainer.state.epoch or 0):.2f}, learning "
            f"rate {lr:.3g}): training diverged; lower train.lr (e.g. by 10x) or set max_grad_norm lower"
        ) from None
    finally:
        hook.remove()
    processes = distributed.world_size()
    history = history_rows(trainer.state.log_history)
    epochs = epoch_rows(history)
    best_epoch = _best_epoch(trainer.state, epochs) if monitor is not None else None
    write_jsonl(run.history_file, history)
    train_seconds = sum(r.get("epoch_seconds", 0.0) for r in epochs)
    samples = _samples_seen(trainer.state, spec, len(train_set), processes)
    tokens = int(trainer.state.num_input_tokens_seen)
    return TrainResult(
        train_seconds=round(train_seconds, 3),
        wall_seconds=round(max((r.get("wall_seconds", 0.0) for r in epochs), default=0.0), 3),
        epochs_run=round(float(trainer.state.epoch or 0), 4),
        steps=int(trainer.state.global_step),
        samples_per_second=round(samples / train_seconds, 2) if train_seconds else 0.0,
        tokens_per_second=round(tokens / train_seconds, 1) if train_seconds else 0.0,
        tokens_seen=tokens,
        peak_memory_mib=memory.mib,
        memory_kind=memory.kind,
        history=history,
        resumed_from=resume.name if resume else None,
        stopped_early=monitor is not None and trainer.state.global_step < trainer.state.max_steps,
        best_epoch=best_epoch,
        best_metric=trainer.state.best_metric if monitor is not None else None,
        processes=processes,
    )


def _run_settings(run: RunDir, spec: TrainSpec) -> dict[str, Any]:
    """What trackers record as the run's hyperparameters: its config.yaml (resolved settings), or the
    training settings when there is none (engine.train called on its own)."""
    return run.config() or {"train": spec.model_dump()}


def _best_epoch(state: Any, history: list[dict[str, Any]]) -> float | None:
    """The epoch whose checkpoint the Trainer kept as best (its folder is checkpoint-<step>)."""
    if not state.best_model_checkpoint:
        return None
    step = int(str(state.best_model_checkpoint).rstrip("/").rsplit("-", 1)[-1])
    return next((row["epoch"] for row in history if row.get("step") == step), None)


def _quiet(trainer: Any) -> None:
    """peftlab prints its own one line per epoch; the Trainer's raw log dicts would repeat it."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def _samples_seen(state: Any, spec: TrainSpec, n_train: int, processes: int) -> int:
    """Training samples processed: optimizer steps x global batch, capped per epoch at the set size."""
    full_epochs, extra_steps = divmod(int(state.global_step), steps_per_epoch(spec, n_train, processes))
    return full_epochs * n_train + min(extra_steps * spec.batch_size * spec.grad_accum * processes, n_train)


def predict(
    model: nn.Module,
    features: Dataset,
    collator: Callable,
    spec: TrainSpec,
    *,
    precision: str,
    reduce: Callable[[Any, Any], Any] | None = None,
) -> tuple[Any, float]:
    """The model's raw outputs on `features` (logits; a tuple for multi-output heads), and seconds.

    `reduce(logits, labels)`, when given, shrinks each batch's outputs before they are collected.
    """
    ordered, restore = by_length(features)
    with _scratch_dir() as tmp:
        args = training_arguments(spec, tmp, has_eval=False, precision=precision, quiet=True)
        trainer = _trainer_class()(model=model, args=args, data_collator=collator, preprocess_logits_for_metrics=reduce)
        _quiet(trainer)
        start = time.perf_counter()
        output = trainer.predict(ordered)
    return restore(output.predictions), time.perf_counter() - start


def _trainer_class() -> type:
    """The Trainer, evaluating in the dataset's order.

    transformers 5.x applies `train_sampling_strategy="group_by_length"` to evaluation as well, in a
    random order of length groups that the outputs are not put back from. peftlab matches outputs to
    examples by position, so evaluation keeps the dataset's order here, and `by_length` sorts the data
    beforehand (same padding saving, order restored).
    """
    from torch.utils.data import RandomSampler, SequentialSampler
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class OrderedEvalTrainer(Trainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            """Grouped by the tokens a row costs padded (`_row_tokens`: multiple choice counts choices x
            longest, where transformers would count choices); a dataset without token ids is shuffled."""
            data = train_dataset if train_dataset is not None else self.train_dataset
            if self.args.train_sampling_strategy != "group_by_length" or data is None:
                return super()._get_train_sampler(train_dataset)
            if "input_ids" not in getattr(data, "column_names", ()):
                return RandomSampler(data)
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(batch, lengths=[_row_tokens(ids) for ids in data["input_ids"]])

        def _get_eval_sampler(self, eval_dataset: Any) -> Any:
            if self.args.train_sampling_strategy != "group_by_length" or eval_dataset is None:
                return super()._get_eval_sampler(eval_dataset)
            return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None  # None: accelerate shards

    return OrderedEvalTrainer


def _row_tokens(ids: Sequence[Any]) -> int:
    """Tokens a row costs once padded: its length, or choices x longest choice (multiple choice)."""
    if ids and isinstance(ids[0], Sequence):
        return len(ids) * max(len(choice) for choice in ids)
    return len(ids)


def by_length(features: Dataset) -> tuple[Dataset, Callable[[Any], Any]]:
    """`features` sorted by length (batches of similar lengths: little padding, and the same outputs, as
    the attention mask hides padding), and the function that puts outputs back in the given order.

    Outputs are an array with one row per feature, or nested tuples/lists of such arrays."""
    import numpy as np

    if "input_ids" not in features.column_names or len(features) < 2:
        return features, lambda outputs: outputs
    order = np.argsort([_row_tokens(ids) for ids in features["input_ids"]], kind="stable")
    if bool((order == np.arange(len(order))).all()):
        return features, lambda outputs: outputs
    back = np.empty_like(order)
    back[order] = np.arange(len(order))

    def restore(outputs: Any) -> Any:
        if isinstance(outputs, tuple | list):
            return type(outputs)(restore(o) for o in outputs)
        return outputs[back] if isinstance(outputs, np.ndarray) and len(outputs) == len(back) else outputs

    return features.select(order), restore


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_ids: Sequence[int],
    max_new_tokens: int,
    batch_size: int = 16,
    precision: str = "fp32",
    stop: Callable[[list[int]], bool] | None = None,
    min_new_tokens: int = 0,
) -> tuple[list[list[int]], float]:
    """Greedy continuations of token-id prompts, batched: (generated ids per prompt, in the given order; seconds).

    Text generation is one forward pass per new token, so it is not the Trainer's `predict`: this runs
    transformers' `generate` (plain and PEFT models alike) with the KV cache, in batches of prompts of
    similar length (sorted, so little padding), left-padded so every row's next token is at the end.
    The attention mask hides the padding and positions count real tokens only, so a row generates the
    same tokens whatever its batch.

    A row ends with its first token in `eos_ids`, or with the first token after which `stop(its generated
    ids)` is true (both tokens are kept in its ids, so the caller sees why it ended), or after
    `max_new_tokens`; nothing after its end is returned, whatever the rest of its batch still generates.
    `min_new_tokens` keeps the end tokens from being chosen before that many tokens (benchmarks use it
    to generate a fixed number of tokens). bf16/fp16 run under autocast, as in training.
    """
    from transformers import GenerationConfig

    if max_new_tokens <= 0 or batch_size <= 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be positive")
    if not eos_ids:
        raise ValueError("eos_ids: at least one end token is needed (the model's own would apply otherwise)")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt: generation needs at least one token to continue")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens or None,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=list(eos_ids),
        use_cache=True,
    )
    device = _generation_device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    generated: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.no_grad(), _autocast(precision, device):
            for at in range(0, len(order), batch_size):
                rows = order[at : at + batch_size]
                outputs = _generate_batch(model, [prompts[i] for i in rows], config, device, set(eos_ids), stop)
                for i, ids in zip(rows, outputs, strict=True):
                    generated[i] = ids
    finally:
        model.train(was_training)
    return generated, time.perf_counter() - start


def _generate_batch(
    model: nn.Module,
    prompts: list[Sequence[int]],
    config: Any,
    device: torch.device,
    eos_ids: set[int],
    stop: Callable[[list[int]], bool] | None,
) -> list[list[int]]:
    """One left-padded batch through model.generate; each row's ids cut where that row ended."""
    from transformers import StoppingCriteriaList

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), config.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[i, width - len(prompt) :] = 1
    ends = _row_ends(len(prompts), width, eos_ids, stop)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        generation_config=config,
        stopping_criteria=StoppingCriteriaList([ends]),
    )
    new = out[:, width:].tolist()
    limit = config.max_new_tokens
    return [row[: end if end is not None else limit] for row, end in zip(new, ends.ends, strict=True)]


def _row_ends(rows: int, width: int, eos_ids: set[int], stop: Callable[[list[int]], bool] | None) -> Any:
    """A stopping criterion that records, per row, how many tokens it had generated when it ended.

    transformers pads a finished row (and may run a step past the end and undo it): the recorded
    lengths, not the returned matrix, say where each row's own tokens stop.
    """
    from transformers import StoppingCriteria

    class RowEnds(StoppingCriteria):
        def __init__(self) -> None:
            self.ends: list[int | None] = [None] * rows

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            step = input_ids.shape[1] - width
            last = input_ids[:, -1].tolist()
            for i, token in enumerate(last):
                if self.ends[i] is None and (
                    token in eos_ids or (stop is not None and stop(input_ids[i, width:].tolist()))
                ):
                    self.ends[i] = step
            return torch.tensor([end is not None for end in self.ends], dtype=torch.bool, device=input_ids.device)

    return RowEnds()


def _generation_device(model: nn.Module) -> torch.device:
    """Where generation runs: the model's device; a CPU model moves to the GPU when there is one, as the
    Trainer moves it for `predict` (not a quantized or device-mapped model, which stays where it was put)."""
    device = next(model.parameters()).device
    placed = any(getattr(model, name, None) for name in ("hf_device_map", "hf_quantizer", "is_quantized"))
    if device.type == "cpu" and torch.cuda.is_available() and not placed:
        model.to("cuda")
        return torch.device("cuda")
    return device


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast as the Trainer applies it in training and prediction; fp32: nothing."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="peftlab-eval-") as tmp:
        yield Path(tmp)


def set_threads() -> None:
    """Respect OMP_NUM_THREADS / PEFTLAB_THREADS; torch's default already uses every core."""
    threads = os.environ.get("PEFTLAB_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
