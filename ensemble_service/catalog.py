"""One generic registry (timm-style): names -> entries, filled by a decorator.

The model families (``ensemble_service.models``), the data sources (``ensemble_service.data``) and
the ensemble strategies (``ensemble_service.strategies``) each keep one :class:`Catalog`. An unknown
name raises the catalog's error type with one line naming the registered choices::

    MODELS = Catalog("model", ModelError)

    @MODELS.register("mlp")
    def mlp(...): ...

    MODELS.get("foo")   # ModelError: unknown model 'foo'; choose one of: mlp
"""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, List, Type, TypeVar

T = TypeVar("T")


class Catalog(Generic[T]):
    """Named entries of one kind; registering a name twice is a ``ValueError``."""

    def __init__(self, kind: str, error: Type[Exception] = ValueError):
        self.kind = kind
        self.error = error
        self._entries: Dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@catalog.register("name")`` adds the decorated object under ``name``."""
        def decorator(entry: T) -> T:
            self.add(name, entry)
            return entry
        return decorator

    def get(self, name: object) -> T:
        entry = self._entries.get(name) if isinstance(name, str) else None
        if entry is None:
            raise self.error(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return entry

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
