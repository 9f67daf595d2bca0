"""Tasks, one module each, registered by name in TASKS."""

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

__all__ = ["TASKS", "Prediction", "Task"]
