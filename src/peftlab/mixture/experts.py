"""Which finished runs a mixture combines, checked before anything is built or trained.

An expert is a finished LoRA run. The mixture needs every expert on the same base model (their LoRA
matrices are updates of the same weights), one expert per task (each task's head is its expert's), and
changes that live in the LoRA matrices only (no trained biases, no DoRA, no 4-bit base). Each problem
is an InputError naming the expert, raised before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.errors import InputError
from peftlab.integrity import sha256_file
from peftlab.store import RunDir, parse_json, read_text
from peftlab.tasks import Task, task_from_config

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Expert:
    """One LoRA expert: the run it comes from, its task (the key its head and examples belong to)."""

    name: str  # the task key: the expert's run group task, else the task's name
    folder: Path
    config: dict[str, Any]  # the run's config.yaml
    adapter: dict[str, Any]  # PEFT's adapter_config.json
    sha256: str  # of adapter_model.safetensors: a changed expert is caught on reload

    @property
    def weights_file(self) -> Path:
        return self.folder / "adapter" / ADAPTER_WEIGHTS

    def task(self) -> Task:
        return task_from_config(self.config["task"])

    @property
    def max_length(self) -> int:
        return int(self.config["data"]["max_length"])


def read_expert(folder: Path) -> Expert:
    """A finished LoRA run as an expert; InputError naming the folder when it cannot be one."""
    run = RunDir(folder)
    if not run.config_file.exists():
        raise InputError(f"expert {folder}: not a run folder (no config.yaml)")
    config = run.config()
    if config.get("method") != "lora":
        raise InputError(f"expert {folder}: a {config.get('method')} run, not a LoRA run; a mixture combines LoRA runs")
    if problem := run.unfinished():
        raise InputError(f"expert {folder}: {problem}")
    weights = folder / "adapter" / ADAPTER_WEIGHTS
    if not weights.exists():
        raise InputError(f"expert {folder}: its adapter has no {ADAPTER_WEIGHTS}; retrain it")
    if problem := run.damage():
        raise InputError(f"expert {folder}: its files are damaged ({problem})")
    adapter = parse_json(read_text(folder / "adapter" / ADAPTER_CONFIG, max_bytes=1 << 20), str(folder / "adapter"))
    settings = config.get("settings") or {}
    if settings.get("quantize") or adapter.get("use_dora") or adapter.get("bias", "none") != "none":
        raise InputError(
            f"expert {folder}: its update is not only LoRA matrices (quantize, DoRA or trained biases); "
            "a mixture weighs LoRA matrices and needs experts of plain LoRA"
        )
    name = (config.get("group") or {}).get("task") or config["task"]["name"]
    return Expert(name, folder, config, adapter, sha256_file(weights))


def check_experts(experts: list[Expert]) -> None:
    """Experts that can be mixed: at least two, one per task, all on the same base model."""
    if len(experts) < 2:
        raise InputError(f"a mixture needs at least two experts; got {len(experts)}")
    first = experts[0]
    seen: dict[str, Path] = {}
    for expert in experts:
        if expert.config.get("model") != first.config.get("model"):
            raise InputError(
                f"expert {expert.folder}: base model {_model(expert)} differs from {first.folder}'s ({_model(first)}); "
                "experts must adapt the same base model"
            )
        if expert.name in seen:
            raise InputError(
                f"expert {expert.folder}: a second expert for task '{expert.name}' (first: {seen[expert.name]}); "
                "a mixture takes one expert per task"
            )
        seen[expert.name] = expert.folder


def _model(expert: Expert) -> str:
    model = expert.config.get("model")
    return model if isinstance(model, str) else f"{(model or {}).get('arch')} (random, {model})"
