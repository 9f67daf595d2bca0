"""Tasks, one module each, registered by name in TASKS."""

from typing import Any

from peftlab.registry import TASKS
from peftlab.tasks import (  # noqa: F401  (importing registers them)
    causal_classification,
    classification,
    lm_generation,
    lm_multiple_choice,
    lm_text,
    multiple_choice,
    ner,
    qa,
)
from peftlab.tasks.base import Prediction, Task

__all__ = ["TASKS", "Prediction", "Task", "task_from_config"]


def task_from_config(section: dict[str, Any]) -> Task:
    """The task a run's config.yaml records (its `task` section: the name and the task's state,
    fitted labels included), rebuilt for evaluation, export or a mixture."""
    state = dict(section)
    return TASKS.get(state.pop("name"))(**state)
