"""The arguments of a Pyro program, sliced by example: a tensor, a tuple or a dict of them.

A model may take one tensor (``model(x)``), several positional arguments (``model(xs, ys)``,
``model(x, mask, lengths)``) or keyword arguments (``model(inputs=..., outputs=...)``). A
`Batch` holds them as they are called: every tensor entry whose first dimension is the
number of examples is sliced per minibatch and per evaluation chunk, the others pass through
unchanged, and an optional ``collate(args, kwargs) -> (args, kwargs)`` builds derived
arguments (a `PackedSequence`, reversed sequences) from the sliced ones at call time.

A program written like Pyro's ``ss_vae_M2`` (``model(xs, ys=None)``) takes labels where an
example has one and no label argument where it has none. `Batch.omit` names that label entry:
such a batch is scored as two calls (`Batch.groups`), its labelled examples with their labels
and its unlabelled ones (label `UNLABELLED`) without the entry, so the program's default
applies. Pyro's own loop alternates labelled and unlabelled minibatches for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Union

import torch

from pyrovae.errors import PyrovaeError

__all__ = ["UNLABELLED", "Batch", "Collate", "Data", "as_batch", "per_example"]

UNLABELLED = -1  # the label of an example without one

Collate = Callable[[tuple, dict], "tuple[tuple, dict]"]
Data = Union[torch.Tensor, tuple, list, Mapping[str, Any], "Batch"]


@dataclass(frozen=True)
class Batch:
    """Positional and keyword arguments of one call, `size` examples along their first dimension.

    `omit`: the position (the last positional argument) or keyword of a label entry that is left
    out of the call for the examples labelled `UNLABELLED`; see `groups`.
    """

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    collate: Collate | None = None
    omit: int | str | None = None

    def __post_init__(self) -> None:
        if not any(torch.is_tensor(v) and v.dim() > 0 for v in self.entries()):
            raise PyrovaeError("the data has no tensor with a leading dimension of examples")
        if self.omit is not None:
            positional = isinstance(self.omit, int)
            if positional and self.omit != len(self.args) - 1 or not positional and self.omit not in self.kwargs:
                raise PyrovaeError("only the last positional argument or a keyword argument can be left out for unlabelled examples")
            label = self.label
            if not (torch.is_tensor(label) and label.dim() == 1 and not label.is_floating_point() and len(label) == len(self)):
                raise PyrovaeError(f"labels left out for unlabelled examples must be one integer per example ({UNLABELLED}: none)")

    @property
    def label(self) -> Any:
        """The entry `omit` names."""
        return self.args[self.omit] if isinstance(self.omit, int) else self.kwargs[str(self.omit)]

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
        return replace(self, args=tuple(keep(v) for v in self.args), kwargs={k: keep(v) for k, v in self.kwargs.items()})

    def __getitem__(self, index: slice | torch.Tensor) -> Batch:
        """The examples `index` (a slice or an index tensor) of every per-example entry."""
        if torch.is_tensor(index):
            return self.map(lambda v: v[index.to(v.device)])
        return self.map(lambda v: v[index])

    def with_primary(self, value: torch.Tensor) -> Batch:
        """The same call with `value` in place of the data tensor (`primary`)."""
        old = self.primary
        swap = lambda v: value if v is old else v  # noqa: E731
        return replace(self, args=tuple(swap(v) for v in self.args), kwargs={k: swap(v) for k, v in self.kwargs.items()})

    def chunks(self, size: int) -> list[Batch]:
        """Consecutive batches of at most `size` examples."""
        return [self[start : start + size] for start in range(0, len(self), size)]

    def to(self, device: torch.device | str) -> Batch:
        return self.map(lambda v: v.to(device))

    def groups(self) -> list[tuple[torch.Tensor | None, Batch]]:
        """The calls that score this batch, each with the rows of this batch it holds (None: all):
        the batch itself, or with `omit` its labelled examples and then its unlabelled ones without
        the label entry. A computation that sums or scores per example does so group by group."""
        if self.omit is None:
            return [(None, self)]
        unlabelled = self.label == UNLABELLED
        labelled_rows, unlabelled_rows = (~unlabelled).nonzero().squeeze(-1), unlabelled.nonzero().squeeze(-1)
        groups = [(rows, replace(self[rows], omit=None)) for rows in (labelled_rows,) if len(rows)]
        groups += [(rows, self[rows].without_label()) for rows in (unlabelled_rows,) if len(rows)]
        return groups or [(None, replace(self, omit=None))]

    def without_label(self) -> Batch:
        """The same call without the entry `omit` names (the program's default takes its place)."""
        if isinstance(self.omit, int):
            return replace(self, args=self.args[: self.omit], omit=None)
        return replace(self, kwargs={k: v for k, v in self.kwargs.items() if k != self.omit}, omit=None)

    def call_args(self) -> tuple[tuple, dict[str, Any]]:
        """The arguments a program is called with, after `collate`."""
        if self.omit is not None:
            groups = self.groups()
            if len(groups) > 1:
                raise PyrovaeError(MIXED)
            return groups[0][1].call_args()
        if self.collate is None:
            return self.args, dict(self.kwargs)
        args, kwargs = self.collate(self.args, dict(self.kwargs))
        return tuple(args), dict(kwargs)

    def call(self, fn: Callable, **extra: Any) -> Any:
        """``fn(*args, **kwargs, **extra)``."""
        args, kwargs = self.call_args()
        return fn(*args, **kwargs, **extra)


def per_example(batch: Batch, score: Callable[[Batch], torch.Tensor]) -> torch.Tensor:
    """``score(part)`` for each call of `batch` (`Batch.groups`), each of shape (..., len(part)),
    put together in the batch's own order of examples."""
    groups = batch.groups()
    if len(groups) == 1:
        return score(groups[0][1])
    parts = [(rows, score(part)) for rows, part in groups]
    out = parts[0][1].new_empty(parts[0][1].shape[:-1] + (len(batch),))
    for rows, values in parts:
        assert rows is not None  # several calls: each holds some rows
        out[..., rows.to(out.device)] = values
    return out


MIXED = ("this computation calls the program once, on a minibatch that mixes labelled and unlabelled examples, "
         "which a program taking no label for unlabelled examples (--unlabelled omit) cannot score in one call")


def as_batch(data: Data, collate: Collate | None = None) -> Batch:
    """A tensor is one positional argument, a tuple or list positional arguments, a dict keyword arguments."""
    if isinstance(data, Batch):
        return data if collate is None else replace(data, collate=collate)
    if torch.is_tensor(data):
        return Batch((data,), {}, collate)
    if isinstance(data, (tuple, list)):
        return Batch(tuple(data), {}, collate)
    if isinstance(data, Mapping):
        return Batch((), dict(data), collate)
    raise PyrovaeError(f"data must be a tensor, a tuple of arguments or a dict of keyword arguments, not {type(data).__name__}")
