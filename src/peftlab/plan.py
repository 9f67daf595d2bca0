"""`peftlab plan`: each run's method, resolved settings, trainable/total parameters, memory estimate.

Nothing is trained and no weights are loaded: the architecture is built from its configuration on
PyTorch's meta device (no memory is allocated), the method is applied, and parameters are counted
as PEFT counts them. When the hub is unreachable, known model configurations come from peftlab's
built-in table, and the plan says so.

The memory figure is an estimate (documented here so it can be checked against measured peaks):
  weights     total params x bytes per weight (4 in fp32; 2 under bf16/fp16 kept as fp32 masters -> 4);
              a method that stores frozen weights otherwise says how many bytes they take
              (`frozen_weight_bytes(model)`: QLoRA's 4-bit linear layers, ~0.52 bytes per weight)
  gradients   trainable x 4 bytes
  optimizer   trainable x 8 bytes (AdamW: two fp32 moments)
  activations per layer s*b*h*(34 + 5*a*s/h) bytes at 16-bit, twice that at fp32 (Korthikanti et
              al., 2022, "Reducing Activation Recomputation in Large Transformer Models"); with
              gradient checkpointing only each layer's input (2*s*b*h bytes) is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from peftlab import engine
from peftlab.config import LoadedExperiment, RunSpec, TrainSpec
from peftlab.data.loading import describe_source, load_splits
from peftlab.errors import InputError
from peftlab.methods import METHODS, count_parameters
from peftlab.mixture.settings import FOLDER, MixtureSpec
from peftlab.models import load_config, load_tokenizer, resolve_model
from peftlab.report.render import aligned_text
from peftlab.tasks import TASKS, Task


@dataclass
class PlanRow:
    run: str
    method: str
    settings: dict[str, Any]
    trainable: int
    total: int
    lr: float
    memory_mib: dict[str, float]

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def plan_experiment(exp: LoadedExperiment, log: Any = print) -> list[PlanRow]:
    """Count parameters and estimate memory for each run of the experiment (each model and task)."""
    said: set[str] = set()

    def once(message: str) -> None:  # the groups of a multi-task experiment share their notes
        if message not in said:
            said.add(message)
            log(message)

    fitted: dict[tuple[str, str], tuple[Task, Any, Any, Any]] = {}
    rows = [row for group in exp.groups() for row in _plan_group(group, once, fitted)]
    return rows + [_plan_mixture(exp, name, spec, fitted) for name, spec in (exp.spec.mixtures or {}).items()]


def _plan_group(
    exp: LoadedExperiment, log: Any, fitted: dict[tuple[str, str], tuple[Task, Any, Any, Any]]
) -> list[PlanRow]:
    """The runs of one (model, task); its fitted task, model source, config and tokenizer go to `fitted`."""
    assert exp.task is not None and exp.spec.data is not None
    task = TASKS.get(exp.task.name)(**exp.task.options)
    _fit_task(exp, task, log)
    source = resolve_model(exp.spec.model, exp.base_dir)
    config, note = load_config(source, allow_known=True)
    if note:
        log(f"note: {note}")
    tokenizer = None if note else _tokenizer_or_none(source)  # a note: the hub is unreachable, skip its retries
    fitted[(exp.group.get("model", ""), exp.group.get("task", ""))] = (task, source, config, tokenizer)
    rows = []
    for run in exp.runs:
        method = METHODS.get(run.method)(**run.settings)
        settings = method.resolve(config.model_type)
        with torch.device("meta"):
            model = task.build_model(source, tokenizer, weights=False)
            model = method.apply(model, head_modules=task.head_modules(model), task_type=task.peft_task_type)
        trainable, total = count_parameters(model)
        memory = estimate_memory(
            config,
            run,
            trainable,
            total,
            exp.spec.data.max_length,
            method.frozen_weight_bytes(model),
            checkpointing=run.train.gradient_checkpointing or method.gradient_checkpointing,
        )
        rows.append(PlanRow(run.name, run.method, settings, trainable, total, float(run.train.lr), memory))
    return rows


def _plan_mixture(
    exp: LoadedExperiment, name: str, spec: MixtureSpec, fitted: dict[tuple[str, str], tuple[Task, Any, Any, Any]]
) -> PlanRow:
    """A mixture's counts: experts of this experiment from their method entry's settings, experts from
    other experiments from their saved adapter config; the architecture assembled on the meta device."""
    from peftlab.mixture.counts import mixture_counts
    from peftlab.mixture.experts import read_expert
    from peftlab.mixture.model import lora_config
    from peftlab.mixture.resolve import expert_folders

    experts: dict[str, tuple[Task, Any]] = {}
    if isinstance(spec.experts, str):
        model_key = spec.model if spec.model is not None else next(iter(exp.spec.models or {"": None}))
        entry = next(r for r in exp.runs if r.entry == spec.experts)
        mine = {task_key: fit for (model, task_key), fit in fitted.items() if model == model_key}
        method = METHODS.get(entry.method)(**entry.settings)
        for task_key, fit in mine.items():
            task, source, config, tokenizer = fit  # every expert shares the base model: the last one serves
            lora = method.peft_config(head_modules=[], task_type=None, model_type=config.model_type)
            experts[task_key] = (task, lora)
    else:
        for folder in expert_folders(exp.spec, spec, exp.runs_dir, exp.base_dir):
            expert = read_expert(folder)
            experts[expert.name] = (expert.task(), lora_config(expert))
            source, tokenizer = resolve_model(expert.config["model"]), None
            config, _ = load_config(source, allow_known=True)
    counts = mixture_counts(experts, source, tokenizer, spec)
    train = TrainSpec(batch_size=spec.train.batch_size, lr=spec.train.lr, precision=spec.train.precision)
    seq = max(int(t.options.model_dump().get("max_length") or 0) for t, _ in experts.values()) or 128
    memory = estimate_memory(config, RunSpec(name, "xlora", {}, train), counts["trainable"], counts["total"], seq, None)
    settings = {
        "experts": ", ".join(experts),
        "gate": f"{spec.gate} (depth {spec.depth}): {counts['gate']:,} weights (formula: {counts['gate_formula']:,})",
        "adapted layers": counts["layers"],
        "experts' LoRA weights": f"{counts['experts']:,}",
        "heads": f"{counts['heads']:,}",
    }
    return PlanRow(f"{FOLDER}/{name}", "xlora", settings, counts["trainable"], counts["total"], spec.train.lr, memory)


def _fit_task(exp: LoadedExperiment, task: Task, log: Any) -> None:
    """Fit the task's state (e.g. labels, which size the head) from the data when it can be read."""
    if not task.needs_data_to_build():
        return
    try:
        splits = load_splits(exp.spec.data, exp.base_dir, needed=("train",))
    except InputError as exc:
        note = task.assume_without_data()
        group = f"[{exp.group_name}] " if exp.group_name else ""
        log(f"note: {group}data not readable ({_shorten(str(exc).splitlines()[0], 160)}); {note}")
        return
    task.prepare(splits, describe_source(exp.spec.data))


def _tokenizer_or_none(source: Any) -> Any:
    """The tokenizer if it can be loaded (random models need it for their vocabulary size)."""
    try:
        return load_tokenizer(source)
    except InputError:
        return None


def estimate_memory(
    config: Any,
    run: RunSpec,
    trainable: int,
    total: int,
    seq: int,
    frozen_bytes: float | None,
    *,
    checkpointing: bool = False,
) -> dict[str, float]:
    """The estimate described in the module docstring, per part and in total, in MiB.

    frozen_bytes: the frozen weights' bytes when the method stores them its own way (4-bit), else
    None (4 bytes each). checkpointing: activations are recomputed (gradient checkpointing).
    """
    precision = engine.resolve_precision(run.train.precision)
    hidden = _first(config, "hidden_size", "dim", "d_model")
    layers = _first(config, "num_hidden_layers", "n_layers", "num_layers")
    heads = _first(config, "num_attention_heads", "n_heads")
    batch = run.train.batch_size
    frozen = total - trainable
    weights = trainable * 4 + (frozen_bytes if frozen_bytes is not None else frozen * 4)
    grads, optimizer = trainable * 4, trainable * 8
    if checkpointing:
        activations = layers * 2 * seq * batch * hidden
    else:
        per_layer = seq * batch * hidden * (34 + 5 * heads * seq / max(hidden, 1))
        activations = layers * per_layer * (2 if precision == "fp32" else 1)
    parts = {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": activations}
    mib = {k: round(v / 2**20, 1) for k, v in parts.items()}
    mib["total"] = round(sum(parts.values()) / 2**20, 1)
    return mib


def _first(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return 0


def format_plan(rows: list[PlanRow]) -> str:
    """An aligned text table for the terminal."""
    header = ["run", "method", "trainable", "total", "% trainable", "lr", "est. memory (MiB)"]
    body = [
        [
            r.run,
            r.method,
            f"{r.trainable:,}",
            f"{r.total:,}",
            f"{r.trainable_pct:.4f}",
            f"{r.lr:g}",
            f"{r.memory_mib['total']:,.0f}",
        ]
        for r in rows
    ]
    settings = [
        f"  {r.run}: " + (", ".join(f"{k}={v}" for k, v in r.settings.items() if v not in (None, [], {})) or "—")
        for r in rows
    ]
    return "\n".join([aligned_text(header, body, left=2), "", "resolved settings:", *settings])


def _shorten(text: str, width: int) -> str:
    """`text` cut at a word boundary to at most `width` characters, with an ellipsis when cut."""
    if len(text) <= width:
        return text
    return text[: width - 1].rsplit(" ", 1)[0].rstrip(" (:,;") + " …"
