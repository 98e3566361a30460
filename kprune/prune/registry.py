"""The registries of pruning's parts (methods, criteria, allocation strategies, schedules): named
objects, one class each, the class docstring its description. Loads without TensorFlow, so that
command-line choices and config validation can be derived from the registries."""

from __future__ import annotations

from typing import Dict, Generic, TypeVar

T = TypeVar("T")


class Registry(Dict[str, T], Generic[T]):
    """Name -> object of one kind, in registration order."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, cls):
        """Class decorator: add one instance of ``cls`` under ``cls.name``."""
        self[cls.name] = cls()
        return cls

    def find(self, name: str) -> T:
        """The object registered as ``name``.

        Raises:
            ValueError: an unknown name (the message lists the known ones).
        """
        if name not in self:
            raise ValueError(f"{self.kind} {name!r}: choose one of {', '.join(self)}")
        return self[name]


class Entry:
    """A registered object: a ``name``, and the first line of its class docstring as its description."""

    name = ""

    @property
    def description(self) -> str:
        return (self.__doc__ or "").strip().splitlines()[0].rstrip(".")
