"""Per-example (non-amortized) variational parameters: one Gaussian, or one point, per example.

The local posterior approximations of Kingma & Welling (2019), appendix A.2: variational EM
(A.2.2) keeps a separate q(z|x_i) for every training example instead of an encoder, and MAP
(A.2.1) a point z_i. Parameters live in sparse embeddings so that a minibatch step (Adam on
the rows it touched, `torch.optim.SparseAdam`) leaves the other examples' parameters alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.distributions import biject_to
from torch.distributions.transforms import ReshapeTransform
from torch.nn.functional import softplus

from pyrovae.batch import Data, as_batch
from pyrovae.errors import PyrovaeError
from pyrovae.registry import GUIDES
from pyrovae.sites import ModelSites, is_real, primary

__all__ = ["COVARIANCES", "LocalGaussian", "flatten", "inverse_softplus", "unflatten"]

CORRELATION_SCALE = 0.1

COVARIANCES = ("diagonal", "full", "point")


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y (y > 0)."""
    return y + torch.log(-torch.expm1(-y))


def flatten(values: dict[str, torch.Tensor], sites: ModelSites) -> torch.Tensor:
    """Latent values {site: (B, *shape)} as one (B, D) tensor, sites in model order."""
    return torch.cat([values[name].reshape(-1, math.prod(shape)) for name, shape in sites.latents.items()], -1)


def unflatten(flat: torch.Tensor, sites: ModelSites) -> dict[str, torch.Tensor]:
    """The inverse of `flatten`: (..., D) -> {site: (..., *shape)}."""
    out, start = {}, 0
    for name, shape in sites.latents.items():
        size = math.prod(shape)
        out[name] = flat[..., start : start + size].reshape(flat.shape[:-1] + shape)
        start += size
    return out


@GUIDES.register("local", "per-example Gaussian q_i(z) (diagonal or full Cholesky), not amortized (appendix A.2.2)")
class LocalGaussian(nn.Module):
    """q(z | x_i) = N(mu_i, Sigma_i) for each of `num_examples` examples, indexed by row.

    Args:
        sites: the model's latent sites (every site must be continuous and unconstrained).
        data_shape: the event shape of one example (unused; kept for `build_guide`).
        num_examples: N, the number of examples with their own parameters.
        covariance: ``"diagonal"``, ``"full"`` (a per-example Cholesky factor per site) or
            ``"point"`` (a Delta: MAP point estimates, appendix A.2.1).
        init_scale: the initial standard deviation of every q_i.

    The guide takes the minibatch `index` (rows of the parameter tables) and `size` from the
    method's `minibatch_kwargs`; `rows` overrides the rows when the model itself takes no
    index (a user's program scored with the N / B factor). Without either, the rows are
    ``arange(len(x))``: a guide fitted on a batch of held-out data (`pyrovae.compare`).

    References:
        Kingma & Welling (2019), appendix A.2.1-A.2.2; Hoffman et al. (2013) for local
        variational parameters in stochastic variational inference.
    """

    latent_shapes: ClassVar[str] = "continuous, any event shape (full covariance per site)"
    gives_elbo: ClassVar[bool] = True

    def __init__(
        self,
        sites: ModelSites,
        data_shape: Sequence[int] = (),
        num_examples: int = 0,
        covariance: str = "diagonal",
        init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if covariance not in COVARIANCES:
            raise PyrovaeError(f"unknown covariance {covariance!r}: choose from {', '.join(COVARIANCES)}")
        if num_examples < 1:
            raise PyrovaeError("the local guide needs num_examples, the number of training examples")
        self.sites, self.covariance, self.num_examples = sites, covariance, num_examples
        self.loc = nn.ModuleDict()
        self.scale = nn.ModuleDict()
        # latents outside the per-example plate: one (diagonal) Gaussian or point each, dense
        self.global_loc = nn.ParameterDict()
        self.global_scale = nn.ParameterDict()
        for name in sites.global_latents:
            d = math.prod(sites.real_shape(name))
            self.global_loc[_key(name)] = nn.Parameter(torch.zeros(d))
            if covariance != "point":
                self.global_scale[_key(name)] = nn.Parameter(inverse_softplus(torch.full((d,), init_scale)))
        for name in sites.latents:
            d = math.prod(sites.real_shape(name))
            self.loc[_key(name)] = _table(num_examples, d, torch.zeros(d))
            if covariance == "diagonal":
                self.scale[_key(name)] = _table(num_examples, d, inverse_softplus(torch.full((d,), init_scale)))
            elif covariance == "full":
                raw = torch.eye(d) * inverse_softplus(torch.tensor(init_scale))
                self.scale[_key(name)] = _table(num_examples, d * d, raw.reshape(-1))

    @classmethod
    def supports(cls, model: Callable, sites: ModelSites) -> str | None:
        """Gaussians (or points) on the reals, carried onto constrained supports by `biject_to`."""
        discrete = sites.unservable()
        if discrete:
            what = ", ".join(f"{k!r} is {v}" for k, v in discrete.items())
            return f"it serves continuous latents, but {what}"
        if sites.subsampled:
            return f"{sites.subsampled}, and its rows are the examples it is given"
        return None

    def tables(self) -> list[nn.Parameter]:
        """The per-example tables (sparse gradients: `torch.optim.SparseAdam`)."""
        return [*self.loc.parameters(), *self.scale.parameters()]

    def global_parameters(self) -> list[nn.Parameter]:
        """The global latents' parameters (dense gradients)."""
        return [*self.global_loc.parameters(), *self.global_scale.parameters()]

    def global_distribution(self, name: str) -> dist.Distribution:
        """q(z_name) of a latent outside the per-example plate, on its real shape."""
        shape = self.sites.real_shape(name)
        loc = self.global_loc[_key(name)].reshape(shape)
        if self.covariance == "point":
            return dist.Delta(loc, event_dim=len(shape))
        scale = (softplus(self.global_scale[_key(name)]) + 1e-5).reshape(shape)
        return dist.Normal(loc, scale).to_event(len(shape))

    def distribution(self, name: str, rows: torch.Tensor) -> dist.Distribution:
        """q(z_name | x_rows) for the examples `rows`, on the site's real (unconstrained) shape."""
        shape = self.sites.real_shape(name)
        loc = self.loc[_key(name)](rows)
        if self.covariance == "point":
            return dist.Delta(loc.reshape(rows.shape + shape), event_dim=len(shape))
        if self.covariance == "diagonal":
            scale = softplus(self.scale[_key(name)](rows)) + 1e-5
            return dist.Normal(loc.reshape(rows.shape + shape), scale.reshape(rows.shape + shape)).to_event(len(shape))
        mvn = dist.MultivariateNormal(loc, scale_tril=self.scale_tril(name, rows))
        if len(shape) == 1:
            return mvn
        return dist.TransformedDistribution(mvn, [ReshapeTransform(mvn.event_shape, shape)])

    def scale_tril(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """The lower-triangular Cholesky factors (B, d, d), positive diagonal via softplus."""
        d = self.loc[_key(name)].embedding_dim
        raw = self.scale[_key(name)](rows).reshape(rows.shape + (d, d))
        diag = softplus(raw.diagonal(dim1=-2, dim2=-1)) + 1e-5
        # Off-diagonal entries are stored divided by CORRELATION_SCALE: Adam steps every entry at
        # the same rate, and unscaled the d(d-1)/2 noisy ones random-walk away from q* (as in
        # guides/full.py, where the same preconditioner is the `correlation_scale` option).
        return CORRELATION_SCALE * raw.tril(-1) + torch.diag_embed(diag)

    def forward(self, *args: Any, index: torch.Tensor | None = None, size: int | None = None, rows: torch.Tensor | None = None, **kwargs: Any) -> None:
        x = primary(args, kwargs)
        rows = rows if rows is not None else index if index is not None else torch.arange(len(x), device=x.device)
        rows = rows.reshape(self.sites.example_shape(len(rows)))
        for name in self.sites.global_latents:
            pyro.sample(name, self.sites.constrain(name, self.global_distribution(name)))
        with self.sites.plate_for(x, index, size):
            for name in self.sites.latents:
                pyro.sample(name, self.sites.constrain(name, self.distribution(name, rows)))

    @torch.no_grad()
    def set_rows(
        self,
        rows: torch.Tensor,
        loc: dict[str, torch.Tensor],
        scale: dict[str, torch.Tensor] | None = None,
        scale_tril: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Overwrite the parameters of `rows`: means, and standard deviations or (full covariance)
        Cholesky factors per site."""
        for name, _shape in self.sites.latents.items():
            self.loc[_key(name)].weight[rows] = loc[name].reshape(len(rows), -1).to(self.loc[_key(name)].weight)
            if scale is None or self.covariance == "point":
                continue
            if self.covariance == "full" and scale_tril and name in scale_tril:
                tril = scale_tril[name].reshape(len(rows), *scale_tril[name].shape[-2:])
                diag = inverse_softplus((tril.diagonal(dim1=-2, dim2=-1) - 1e-5).clamp_min(1e-4))
                raw = (tril.tril(-1) / CORRELATION_SCALE + torch.diag_embed(diag)).reshape(len(rows), -1)
            else:
                raw = inverse_softplus(scale[name].reshape(len(rows), -1).clamp_min(1e-4))
                if self.covariance == "full":
                    raw = torch.diag_embed(raw).reshape(len(rows), -1)
            self.scale[_key(name)].weight[rows] = raw.to(self.scale[_key(name)].weight)

    @torch.no_grad()
    def initialize_from(self, guide: Callable, x: Data, rows: torch.Tensor | None = None, **kwargs: Any) -> None:
        """Start `rows` from an amortized guide's q(z|x) (semi-amortized, Kim et al. 2018).

        Each site's mean and standard deviation are read off the guide's distribution (or
        estimated from 64 draws where it has no closed form); a full-covariance table takes the
        guide's Cholesky factor where it has one, so q* starts exactly at q.
        """
        batch = as_batch(x)
        rows = rows if rows is not None else torch.arange(len(batch), device=batch.device)
        trace = batch.call(poutine.trace(guide).get_trace, **kwargs)
        loc, scale, tril = {}, {}, {}
        for name in self.sites.latents:
            fn = trace.nodes[name]["fn"]
            support = self.sites.supports.get(name)
            try:
                if support is not None and not is_real(support):
                    raise NotImplementedError  # the moments wanted are the unconstrained value's
                loc[name], scale[name] = fn.mean, fn.stddev
            except NotImplementedError:
                draws = fn.sample((64,))
                draws = draws if support is None or is_real(support) else biject_to(support).inv(draws)
                loc[name], scale[name] = draws.mean(0), draws.std(0)
            if hasattr(fn, "scale_tril"):
                tril[name] = fn.scale_tril.expand(loc[name].shape + loc[name].shape[-1:])
        self.set_rows(rows, loc, scale, tril)

    def means(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-example means (the MAP points for ``"point"``) of `rows`."""
        return {name: self.loc[_key(name)](rows).reshape(rows.shape + shape) for name, shape in self.sites.latents.items()}


def _table(rows: int, width: int, init: torch.Tensor) -> nn.Embedding:
    """An (rows, width) parameter table with sparse gradients, every row set to `init`."""
    table = nn.Embedding(rows, width, sparse=True)
    with torch.no_grad():
        table.weight.copy_(init.expand(rows, width))
    return table


def _key(site: str) -> str:
    return site.replace(".", "_")
