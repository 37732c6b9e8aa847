"""A small name → object registry used for weight formats and reconstruction methods."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


def normalize_name(name: str) -> str:
    """Canonical registry key: lower case, ``_`` and spaces become ``-``."""
    return name.strip().lower().replace("_", "-").replace(" ", "-")


class Registry(Generic[T]):
    """Maps normalized names to entries; unknown names raise a ``ValueError`` listing known ones.

    Each instance is owned by the module that defines it (no global registry of registries).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` adds a class or function under ``name``."""
        key = normalize_name(name)

        def deco(obj: T) -> T:
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        key = normalize_name(name)
        try:
            return self._entries[key]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return normalize_name(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
