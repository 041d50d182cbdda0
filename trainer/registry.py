"""One small generic registry: register by explicit name, get with did-you-mean, list."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from trainer.errors import ConfigError

T = TypeVar("T")


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


class Registry(Generic[T]):
    """Maps snake_case names (matching torch's, e.g. ``adamw``) to components.

    Args:
        kind: what the entries are ("model", "optimizer", ...), used in messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator.

        Raises:
            ValueError: ``name`` is already taken (a programming error, not a user one).
        """
        def add(o: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._entries[name]!r})")
            self._entries[name] = o
            return o
        return add if obj is None else add(obj)

    def get(self, name: str, path: str = "name") -> T:
        """The entry called ``name``; a ``ConfigError`` at ``path`` listing the closest names if none."""
        if not isinstance(name, str) or name not in self._entries:
            raise ConfigError(
                path, f"unknown {self.kind} {name!r}", choices=self._entries, given=str(name),
                hint=f"{article(self.kind)} {self.kind} of your own must be registered by a module listed under `imports:`")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

