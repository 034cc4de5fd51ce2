"""Fully observed density models with an exact log-likelihood and no latent sites (sec. 4.5).

They are the baselines that latent-variable models are compared with; pair them with the
`none` guide: every bound then equals log p(x) and `evaluate` reports it.

- `made`: p(x) = prod_d Bernoulli(x_d | x_<d), the logits from one masked MLP (MADE).
- `realnvp`: a flow density: x = g(eps), eps ~ N(0, I), with affine coupling layers, then a
  sigmoid onto [0, 1]. For **binary** data (bernoulli likelihood) it models the uniformly
  dequantized v = x + u, u ~ U[0, 1)^D, drawn inside the model on each call: its log p(v) is
  exact for v, and E_u log p(x + u) <= log P(x) (Theis et al. 2016), so on binary data the
  reported figure is a one-sample *lower bound* on the discrete log-likelihood. For data in
  [0, 1] (continuous-bernoulli or gaussian likelihood choice) it is the exact density of x.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import AffineCoupling, AffineTransform, Permute, SigmoidTransform
from pyro.nn import DenseNN
from torch import nn

from pyrovae.conv import MADE, AutoregressiveBernoulli
from pyrovae.errors import PyrovaeError
from pyrovae.nets import LIKELIHOODS
from pyrovae.registry import MODELS
from pyrovae.sites import data_plate, register

__all__ = ["MADEModel", "RealNVPModel"]


@MODELS.register("made", "fully observed: MADE, autoregressive Bernoulli over pixels, exact log p(x) (Germain et al. 2015)")
class MADEModel(nn.Module):
    """p(x) = prod_d p(x_d | x_<d) in raster order, one masked MLP for all conditionals.

    Args:
        data_shape: event shape of one example.
        hidden: masked hidden layer sizes.
        activation: nonlinearity.
        likelihood: "bernoulli" (binary data) or "continuous-bernoulli" (data in [0, 1]).

    References:
        Germain, Gregor, Murray & Larochelle (2015), MADE: Masked Autoencoder for Distribution
        Estimation, sec. 4; Kingma & Welling (2019), sec. 4.5.
    """

    def __init__(self, data_shape: Sequence[int], hidden: Sequence[int] = (500,), activation: str = "relu", likelihood: str = "bernoulli") -> None:
        super().__init__()
        if likelihood not in ("bernoulli", "continuous-bernoulli"):
            raise PyrovaeError("the made model takes --likelihood bernoulli or continuous-bernoulli")
        self.data_shape = torch.Size(data_shape)
        self.dim = math.prod(self.data_shape)
        self.likelihood = LIKELIHOODS.get(likelihood)(self.dim)
        self.continuous = likelihood == "continuous-bernoulli"
        self.net = MADE(self.dim, list(hidden), activation)

    def distribution(self, batch: int) -> AutoregressiveBernoulli:
        return AutoregressiveBernoulli(self.net, None, self.dim, (batch,), self.continuous)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> None:
        register("made", self)
        with data_plate(x, index, size):
            pyro.sample("x", self.distribution(len(x)), obs=x.reshape(len(x), -1))

    def check_data(self, x: torch.Tensor) -> None:
        self.likelihood.check(x)


class _FlowDensity(dist.TransformedDistribution):
    """A transformed distribution whose `mean` is one draw mapped to [0, 1] (for sample grids)."""

    unit_scale = 1.0

    @property
    def mean(self) -> torch.Tensor:  # not the mean: a draw, which is what a sample grid needs
        with torch.no_grad():
            return (self.sample() / self.unit_scale).clamp(0, 1)


class _DequantizedFlowDensity(_FlowDensity):
    unit_scale = 2.0


@MODELS.register("realnvp", "fully observed: RealNVP affine-coupling flow on x, exact density (binary data: uniform dequantization)")
class RealNVPModel(nn.Module):
    """x = h(f(eps)), eps ~ N(0, I): f = affine couplings (order reversed between them), h = sigmoid onto [0, 1].

    h(s) = (sigmoid(s) - alpha) / (1 - 2 alpha) (the logit preprocessing of Real NVP, sec. 4.1);
    for binary data the observed value is v = x + u (u ~ U[0, 1)) and h maps onto [0, 2).

    Args:
        data_shape: event shape of one example.
        hidden: hidden sizes of each coupling's network.
        likelihood: "bernoulli" means binary data, dequantized; otherwise the data are in [0, 1].
        flow_steps: number of coupling layers.
        alpha: the margin of the logit preprocessing.

    References:
        Dinh, Sohl-Dickstein & Bengio (2017), Density estimation using Real NVP, sec. 3.3-3.5, 4.1;
        Theis, van den Oord & Bethge (2016), A note on the evaluation of generative models, sec. 3.1;
        Kingma & Welling (2019), sec. 4.5.
    """

    def __init__(self, data_shape: Sequence[int], hidden: Sequence[int] = (200, 200), likelihood: str = "bernoulli", flow_steps: int = 6, alpha: float = 0.05) -> None:
        super().__init__()
        self.data_shape = torch.Size(data_shape)
        dim = self.dim = math.prod(self.data_shape)
        if dim < 2 or flow_steps < 1:
            raise PyrovaeError("realnvp needs at least two dimensions and one coupling layer")
        self.dequantize = likelihood == "bernoulli"
        self.alpha = alpha
        split = dim // 2
        self.couplings = nn.ModuleList(
            AffineCoupling(split, DenseNN(split, list(hidden), [dim - split, dim - split])) for _ in range(flow_steps)
        )
        self.register_buffer("reverse", torch.arange(dim - 1, -1, -1), persistent=False)
        self.register_buffer("zero", torch.zeros(()), persistent=False)

    def transforms(self) -> list:
        out: list = []
        for i, coupling in enumerate(self.couplings):
            if i:
                out.append(Permute(self.reverse))
            out.append(coupling)
        a = self.alpha
        out += [SigmoidTransform(), AffineTransform(-a / (1 - 2 * a), 1 / (1 - 2 * a))]
        if self.dequantize:
            out.append(AffineTransform(0.0, 2.0))
        return out

    def distribution(self, batch: int) -> dist.TransformedDistribution:
        base = dist.Normal(self.zero, 1.0).expand([batch, self.dim]).to_event(1)
        return (_DequantizedFlowDensity if self.dequantize else _FlowDensity)(base, self.transforms())

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> None:
        register("realnvp", self)
        v = x.reshape(len(x), -1)
        if self.dequantize:
            v = v + torch.rand_like(v)
        with data_plate(x, index, size):
            pyro.sample("x", self.distribution(len(x)), obs=v)

    def check_data(self, x: torch.Tensor) -> None:
        if self.dequantize:
            LIKELIHOODS.get("bernoulli")(self.dim).check(x)
        elif ((x < 0) | (x > 1)).any():
            raise PyrovaeError("realnvp models data in [0, 1]: rescale it (or binarize it and use --likelihood bernoulli)")
