"""A name -> factory table, so the CLI and the benchmark never grow `if name == ...` ladders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from lfm.errors import LFMError, shown

T = TypeVar("T")


class Registry(Generic[T]):
    """Named factories of one kind (datasets, models, losses, methods, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator that files a factory under `name`."""

        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = fn
            self._help[name] = help or (fn.__doc__ or "").strip().split("\n")[0]
            return fn

        return deco

    def get(self, name: str) -> Callable[..., T]:
        """The factory filed under `name`, or an error that lists the known names."""
        if name not in self._items:
            known = ", ".join(sorted(self._items))
            raise LFMError(f"unknown {self.kind} {shown(name)}", f"choose one of: {known}")
        return self._items[name]

    def create(self, name: str, *args, **kwargs) -> T:
        """Build the object filed under `name`."""
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def help(self, name: str) -> str:
        """One line describing `name`."""
        return self._help[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
