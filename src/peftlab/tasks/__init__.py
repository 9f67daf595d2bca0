"""Tasks, one module each, registered by name in TASKS."""

from peftlab.registry import TASKS
from peftlab.tasks import classification  # noqa: F401  (importing registers it)
from peftlab.tasks.base import Prediction, Task

__all__ = ["TASKS", "Prediction", "Task"]
