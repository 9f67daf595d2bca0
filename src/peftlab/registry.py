"""A small name -> class registry for tasks and methods.

A new task or method is one new module that decorates its class with `@TASKS.register("name")`
(or `METHODS`), plus one import line in its package's `__init__`. Lookups of unknown names raise
`InputError` with the known names and a did-you-mean, so a typo in an experiment file is caught
while the config is validated, before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from peftlab.errors import InputError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes of one kind ("task", "method")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: register the class under `name` (names are unique)."""

        def decorate(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = item
            return item

        return decorate

    def get(self, name: str) -> T:
        """The class registered as `name`; InputError naming the known ones otherwise."""
        if name not in self._items:
            known = ", ".join(sorted(self._items))
            raise InputError(f"unknown {self.kind} '{name}'{did_you_mean(name, self._items)}; known: {known}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


# The two registries. Modules register into them at import; `peftlab.tasks` and `peftlab.methods`
# import every built-in module, so importing those packages fills the registries.
TASKS: Registry = Registry("task")
METHODS: Registry = Registry("method")
