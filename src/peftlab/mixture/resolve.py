"""Which runs a mixture's `experts:` names, checked while the experiment file is validated (no disk, no
torch) and resolved to run folders when the mixture is about to train."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol

from peftlab.mixture.settings import MixtureSpec

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Problems(Protocol):
    def add(self, path: tuple[str, ...], message: str) -> None: ...


def _lora_entries(methods: dict[str, dict[str, Any]]) -> list[str]:
    return [name for name, entry in methods.items() if (entry or {}).get("method", name) == "lora"]


def _task_keys(spec: Any) -> list[str]:
    if spec.tasks is None:
        return []
    return [
        entry.key or (entry.task if isinstance(entry.task, str) else str(entry.task.get("name")))
        for entry in spec.tasks
    ]


def check_mixtures(spec: Any, problems: Problems) -> None:
    """Config-level checks of `mixtures:` (spec: config.Experiment): the entry is a LoRA method entry
    of a multi-task experiment, the model key exists; expert lists name this experiment's LoRA runs or
    folders. Whether the runs are finished is checked when the mixture trains."""
    models = list(spec.models or {})
    tasks = _task_keys(spec)
    lora = _lora_entries(spec.methods)
    for name, mixture in (spec.mixtures or {}).items():
        where = ("mixtures", name)
        if not NAME.match(name):
            problems.add(where, f"mixture name '{name}' may use only letters, digits, '_', '.', '-'")
        if mixture.model is not None and mixture.model not in models:
            problems.add(
                (*where, "model"), f"'{mixture.model}' is not a key of `models:` ({', '.join(models) or 'none'})"
            )
        if mixture.model is None and len(models) > 1 and isinstance(mixture.experts, str):
            problems.add(
                (*where, "model"), f"the experiment has several models: name the one to mix ({', '.join(models)})"
            )
        if isinstance(mixture.experts, str):
            if mixture.experts not in lora:
                problems.add(
                    (*where, "experts"),
                    f"'{mixture.experts}' is not a LoRA method entry of this experiment (LoRA entries: "
                    f"{', '.join(lora) or 'none'}); name one, or list run names / run folders",
                )
            if len(tasks) < 2:
                problems.add(
                    (*where, "experts"), "a mixture of one entry's runs needs `tasks:` with at least two tasks"
                )


def expert_folders(spec: Any, mixture: MixtureSpec, runs_dir: Path, base_dir: Path) -> list[Path]:
    """The experts' run folders: the entry's run of each task of the model, or the listed runs/folders
    (a name without '/' is a run of this experiment; a path is relative to the experiment file)."""
    if isinstance(mixture.experts, str):
        model = mixture.model if mixture.model is not None else next(iter(spec.models or {"": None}))
        return [runs_dir / ".".join(v for v in (model, task, mixture.experts) if v) for task in _task_keys(spec)]
    out = []
    for item in mixture.experts:
        path = Path(item).expanduser()
        if "/" in item or path.is_absolute():
            out.append(path if path.is_absolute() else base_dir / path)
        else:
            out.append(runs_dir / item)
    return out
