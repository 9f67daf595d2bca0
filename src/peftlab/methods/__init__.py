"""Fine-tuning methods, one module each, registered by name in METHODS."""

from typing import Any

from peftlab.methods import full, ia3, lora  # noqa: F401  (importing registers them)
from peftlab.methods.base import Method, count_parameters
from peftlab.registry import METHODS

__all__ = ["METHODS", "Method", "count_parameters", "method_from_config"]


def method_from_config(config: dict[str, Any]) -> Method:
    """The method a run's config.yaml records (`method` and its `settings` as given; resolved
    defaults are valid settings too), rebuilt for reloading or export."""
    return METHODS.get(config["method"])(**dict(config.get("settings") or {}))
