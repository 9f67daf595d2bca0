"""Tasks, one module each, registered by name in TASKS."""

from peftlab.registry import TASKS
from peftlab.tasks import classification, multiple_choice, ner, qa  # noqa: F401  (importing registers them)
from peftlab.tasks.base import Prediction, Task

__all__ = ["TASKS", "Prediction", "Task"]
