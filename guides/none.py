"""The empty guide, for fully observed models (no latent sites): the ELBO is then log p(x)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from pyrovae.errors import PyrovaeError
from pyrovae.registry import GUIDES
from pyrovae.sites import ModelSites

__all__ = ["NoGuide"]


@GUIDES.register("none", "samples nothing: for fully observed models (made, realnvp), where ELBO = exact log p(x)")
class NoGuide(nn.Module):
    """A guide with no sample sites and no parameters.

    With it, every objective reduces to log p(x) of the model (Trace_ELBO, the IWAE bound and
    the importance-sampled estimate all equal it), so a fully observed density model is
    trained and evaluated by the same code as a latent-variable one.

    References:
        Kingma & Welling (2019), sec. 4.5 (fully observed autoregressive and flow models as
        the baselines that latent-variable models are compared with).
    """

    analytic_kl: ClassVar[bool] = True
    gives_elbo: ClassVar[bool] = True
    latent_shapes: ClassVar[str] = "none (fully observed models)"

    def __init__(self, sites: ModelSites, data_shape: Sequence[int], hidden: Sequence[int] = (), activation: str = "tanh") -> None:
        super().__init__()
        reason = self.supports(None, sites)
        if reason:
            raise PyrovaeError(reason)

    @classmethod
    def supports(cls, model: Callable, sites: ModelSites) -> str | None:
        if sites.latents:
            return f"it samples nothing, but the model has latent sites {sites.describe()}"
        return None

    def forward(self, *args: Any, index: torch.Tensor | None = None, size: int | None = None, **kwargs: Any) -> None:
        return None
