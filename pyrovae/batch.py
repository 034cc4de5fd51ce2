"""The arguments of a Pyro program, sliced by example: a tensor, a tuple or a dict of them.

A model may take one tensor (``model(x)``), several positional arguments (``model(xs, ys)``,
``model(x, mask, lengths)``) or keyword arguments (``model(inputs=..., outputs=...)``). A
`Batch` holds them as they are called: every tensor entry whose first dimension is the
number of examples is sliced per minibatch and per evaluation chunk, the others pass through
unchanged, and an optional ``collate(args, kwargs) -> (args, kwargs)`` builds derived
arguments (a `PackedSequence`, reversed sequences) from the sliced ones at call time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from pyrovae.errors import PyrovaeError

__all__ = ["Batch", "Collate", "Data", "as_batch"]

Collate = Callable[[tuple, dict], "tuple[tuple, dict]"]
Data = Union[torch.Tensor, tuple, list, Mapping[str, Any], "Batch"]


@dataclass(frozen=True)
class Batch:
    """Positional and keyword arguments of one call, `size` examples along their first dimension."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    collate: Collate | None = None

    def __post_init__(self) -> None:
        if not any(torch.is_tensor(v) and v.dim() > 0 for v in self.entries()):
            raise PyrovaeError("the data has no tensor with a leading dimension of examples")

    def entries(self) -> list[Any]:
        return [*self.args, *self.kwargs.values()]

    @property
    def primary(self) -> torch.Tensor:
        """The first tensor argument: what built-in guides encode and what sets the batch size."""
        return next(v for v in self.entries() if torch.is_tensor(v) and v.dim() > 0)

    def __len__(self) -> int:
        return int(self.primary.shape[0])

    @property
    def device(self) -> torch.device:
        return self.primary.device

    @property
    def is_tensor(self) -> bool:
        """True for the plain one-tensor call ``model(x)``."""
        return len(self.args) == 1 and not self.kwargs and self.collate is None

    def _per_example(self, value: Any) -> bool:
        return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == len(self)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """`fn` applied to every per-example tensor, the other entries kept."""
        keep = lambda v: fn(v) if self._per_example(v) else v  # noqa: E731
        return Batch(tuple(keep(v) for v in self.args), {k: keep(v) for k, v in self.kwargs.items()}, self.collate)

    def __getitem__(self, index: slice | torch.Tensor) -> Batch:
        """The examples `index` (a slice or an index tensor) of every per-example entry."""
        if torch.is_tensor(index):
            return self.map(lambda v: v[index.to(v.device)])
        return self.map(lambda v: v[index])

    def with_primary(self, value: torch.Tensor) -> Batch:
        """The same call with `value` in place of the data tensor (`primary`)."""
        old = self.primary
        swap = lambda v: value if v is old else v  # noqa: E731
        return Batch(tuple(swap(v) for v in self.args), {k: swap(v) for k, v in self.kwargs.items()}, self.collate)

    def chunks(self, size: int) -> list[Batch]:
        """Consecutive batches of at most `size` examples."""
        return [self[start : start + size] for start in range(0, len(self), size)]

    def to(self, device: torch.device | str) -> Batch:
        return self.map(lambda v: v.to(device))

    def call_args(self) -> tuple[tuple, dict[str, Any]]:
        """The arguments a program is called with, after `collate`."""
        if self.collate is None:
            return self.args, dict(self.kwargs)
        args, kwargs = self.collate(self.args, dict(self.kwargs))
        return tuple(args), dict(kwargs)

    def call(self, fn: Callable, **extra: Any) -> Any:
        """``fn(*args, **kwargs, **extra)``."""
        args, kwargs = self.call_args()
        return fn(*args, **kwargs, **extra)


def as_batch(data: Data, collate: Collate | None = None) -> Batch:
    """A tensor is one positional argument, a tuple or list positional arguments, a dict keyword arguments."""
    if isinstance(data, Batch):
        return data if collate is None else Batch(data.args, data.kwargs, collate)
    if torch.is_tensor(data):
        return Batch((data,), {}, collate)
    if isinstance(data, (tuple, list)):
        return Batch(tuple(data), {}, collate)
    if isinstance(data, Mapping):
        return Batch((), dict(data), collate)
    raise PyrovaeError(f"data must be a tensor, a tuple of arguments or a dict of keyword arguments, not {type(data).__name__}")
