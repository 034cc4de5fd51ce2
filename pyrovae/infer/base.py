"""The interface every inference method shares: one minibatch step, and its state."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import pyro
from pyro.infer.util import is_validation_enabled
import torch
from torch import nn

from pyrovae.sites import call_kwargs, direct_parameters

__all__ = ["InferenceMethod", "TrainSettings", "adam", "unique_parameters"]


@dataclass(frozen=True)
class TrainSettings:
    """What every method is trained with; the objective is a choice apart from the method."""

    objective: str = "elbo"
    particles: int = 1
    lr: float = 1e-3
    batch_size: int = 100
    max_plate_nesting: int = 1
    free_bits: float = 0.0
    capture: bool = True  # replay the loss from a captured graph where it can (pyrovae.capture)


class InferenceMethod:
    """Learns a model (and, where it has one, a guide) from minibatches of a data set.

    Subclasses implement `step`; `state_dict`/`load_state_dict` cover every module and
    optimizer so that a resumed run continues exactly.
    """

    name: ClassVar[str] = ""
    gives_elbo: ClassVar[bool] = True
    trains_guide: ClassVar[bool] = True  # leaves an amortized guide that can score held-out data

    def __init__(self, model: nn.Module, guide: nn.Module, settings: TrainSettings, num_examples: int) -> None:
        self.model = model
        self.guide = guide
        self.settings = settings
        self.num_examples = num_examples
        self._validated = False
        self._index_keys: tuple[str, ...] | None = None

    def step(self, x: torch.Tensor, index: torch.Tensor, beta: float = 1.0) -> float | torch.Tensor:
        """One update on a minibatch; returns the minibatch loss in nats per example, as a float
        or as a 0-dim tensor left on the device (the training loop reads those in groups)."""
        raise NotImplementedError

    def minibatch_kwargs(self, x: torch.Tensor, index: torch.Tensor | None) -> tuple[dict[str, Any], float]:
        """Keyword arguments for model and guide, and the factor that scales their loss to the data set.

        Programs that take `index`/`size` subsample their ``"data"`` plate themselves (exact
        scaling, and local parameters can be indexed by it): the factor is 1. A user's
        program that takes only `x` is scored on the minibatch and its loss multiplied by N / B.
        """
        if index is None:
            return {}, 1.0
        if self._index_keys is None:  # read the signature once, not every step
            self._index_keys = tuple(call_kwargs(self.model, index=index, size=self.num_examples))
        if self._index_keys:
            return {k: v for k, v in (("index", index), ("size", self.num_examples)) if k in self._index_keys}, 1.0
        return {}, self.num_examples / len(x)

    @contextmanager
    def fast_path(self) -> Iterator[None]:
        """Pyro's shape and support checks on the first step only; no per-step param registration."""
        validate = not self._validated
        self._validated = True
        with direct_parameters(), pyro.validation_enabled(validate and is_validation_enabled()):
            yield

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "guide": self.guide.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.guide.load_state_dict(state["guide"])


def unique_parameters(*modules: nn.Module) -> list[nn.Parameter]:
    """Parameters of all `modules`, each once (a guide may share the model's)."""
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with torch's fused kernel where the device has one (one kernel, not a Python loop per tensor)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)
