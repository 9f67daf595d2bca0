"""Fine-tuning methods, one module each, registered by name in METHODS."""

from peftlab.methods import full, ia3, lora  # noqa: F401  (importing registers them)
from peftlab.methods.base import Method, count_parameters
from peftlab.registry import METHODS

__all__ = ["METHODS", "Method", "count_parameters"]
