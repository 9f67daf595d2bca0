"""Tasks, one module each, registered by name in TASKS."""

from peftlab.registry import TASKS
from peftlab.tasks import causal_classification, classification, multiple_choice, ner  # noqa: F401  (importing registers them)
from peftlab.tasks.base import Prediction, Task

__all__ = ["TASKS", "Prediction", "Task"]
