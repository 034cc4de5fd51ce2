"""The interfaces the layers meet at, as `typing.Protocol`s: a program, a guide, a method.

Any Pyro program is a `Program`. The attributes a pyrovae guide or model may declare beyond
that are optional, so a user's own function or module is served as it is: `guide_traits` and
`model_traits` read them in one place, with the defaults that a plain Pyro program gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from pyrovae.sites import ModelSites

__all__ = ["GuideTraits", "InferenceMethodProtocol", "ModelTraits", "Program", "PyrovaeGuide", "guide_traits", "model_traits"]


@runtime_checkable
class Program(Protocol):
    """A Pyro model or guide: called with the data's arguments (and ``index=``/``size=`` if it
    takes them); its effects are its sample, param and plate statements."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


class PyrovaeGuide(Program, Protocol):
    """A guide built by `pyrovae.guides.build_guide`: the sites it serves and what it gives."""

    sites: ModelSites
    gives_elbo: ClassVar[bool]  # False for point estimates: no ELBO, no importance weights
    analytic_kl: bool  # False where per-site analytic KLs would be biased (guides/hierarchical.py)

    @classmethod
    def supports(cls, model: Any, sites: ModelSites) -> str | None: ...


class InferenceMethodProtocol(Protocol):
    """What the training loop, `compare` and the run directory use of an inference method."""

    name: ClassVar[str]
    gives_elbo: ClassVar[bool]
    trains_guide: bool
    sites: ModelSites | None
    plate: str

    def prepare(self, data: Any) -> None: ...

    def step(self, x: Any, index: torch.Tensor, beta: float = 1.0) -> float | torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class GuideTraits:
    sites: ModelSites | None
    gives_elbo: bool
    analytic_kl: bool


@dataclass(frozen=True)
class ModelTraits:
    data_shape: torch.Size | None  # one example's shape, where the model declares it
    elements_per_sample: int | None  # floats one importance sample costs (a PixelCNN's activations)


def guide_traits(guide: Any) -> GuideTraits:
    """A guide's optional `PyrovaeGuide` attributes, or a plain program's defaults."""
    sites = getattr(guide, "sites", None)
    return GuideTraits(sites if isinstance(sites, ModelSites) else None, bool(getattr(guide, "gives_elbo", True)),
                       bool(getattr(guide, "analytic_kl", True)))


def model_traits(model: Any) -> ModelTraits:
    """A model's optional declarations, or a plain program's defaults."""
    shape = getattr(model, "data_shape", None)
    return ModelTraits(torch.Size(shape) if shape is not None else None, getattr(model, "elements_per_sample", None))
