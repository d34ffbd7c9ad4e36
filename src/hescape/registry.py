"""Registries by name, in the manner of timm's ``register_model`` / ``create_model``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from hescape.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories.

    Examples
    --------
    >>> heads = Registry("head")
    >>> @heads.register("linear")
    ... def linear(dim_in, dim_out): ...
    >>> heads.get("linear")  # doctest: +SKIP
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None):
        """Register ``obj`` under ``name`` (usable as a decorator when ``obj`` is omitted)."""

        def add(item: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = item
            return item

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UnknownNameError(self.kind, name, self._entries)
        return self._entries[name]

    def create(self, name: str, *args, **kwargs):
        factory: Callable = self.get(name)  # type: ignore[assignment]
        return factory(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
