"""Named registries of models, guides, objectives, inference methods and datasets, and of the
parts a model is built from: priors p(z), decoder networks and likelihood heads p(x|z)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from pyrovae.errors import PyrovaeError

__all__ = ["Entry", "Registry", "MODELS", "GUIDES", "OBJECTIVES", "METHODS", "DATASETS", "PRIORS", "DECODERS", "LIKELIHOODS"]

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    target: T
    description: str


class Registry(Generic[T]):
    """A name -> object mapping whose lookups fail with close-match suggestions."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, description: str = "") -> Callable[[T], T]:
        def decorator(target: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = description or (getattr(target, "__doc__", None) or "").strip().split("\n")[0]
            self._entries[name] = Entry(name, target, doc)
            return target

        return decorator

    def get(self, name: str) -> T:
        return self.entry(name).target

    def entry(self, name: str) -> Entry[T]:
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"choose from {', '.join(self)}"
            raise PyrovaeError(f"unknown {self.kind} {name!r}: {hint}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def entries(self) -> list[Entry[T]]:
        return [self._entries[name] for name in self]


MODELS: Registry = Registry("model")
GUIDES: Registry = Registry("guide")
OBJECTIVES: Registry = Registry("objective")
METHODS: Registry = Registry("inference method")
DATASETS: Registry = Registry("dataset")
# the parts of the built-in latent-variable models (`pyrovae.models.priors`, `pyrovae.models.vae`, `pyrovae.nets`)
PRIORS: Registry = Registry("prior")
DECODERS: Registry = Registry("decoder")
LIKELIHOODS: Registry = Registry("likelihood")
