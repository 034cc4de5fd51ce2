"""Conditional models of image completion (Sohn, Lee & Yan 2015; Kingma & Welling 2019, sec. 1.1):
given some quadrants of an image, model the rest.

Both models take the whole image ``x`` as their one argument and split it themselves by
``quadrants`` (1, 2 or 3 given, laid out as Pyro's ``examples/cvae``: bottom-left; the left
half; all but the bottom-right). The observed site is the whole image under a `Completion`, a
point mass on the given pixels and the likelihood on the others, so every bound and importance-
sampled figure that pyrovae reports for them is of the **conditional** log-likelihood
log p(x_out | x_in), per example, and samples and reconstructions are completed images.

- `cvae`: p(x_out | x_in, z) p(z | x_in) with its recognition model q(z | x) the built-in
  `diagonal` guide of the whole image; `evaluate` gives Sohn's importance-sampled conditional
  log-likelihood beside the bound. ``gsnn`` > 0 adds Sohn's GSNN term in training.
- `completion-nn`: the deterministic baseline p(x_out | x_in) of one network, exact (`--guide none`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn

from pyrovae.errors import PyrovaeError
from pyrovae.models.vae import DecoderMixin
from pyrovae.nets import MLP, broadcast_cat
from pyrovae.registry import MODELS
from pyrovae.sites import data_plate, register

__all__ = ["CVAE", "Completion", "CompletionNet", "given_quadrants"]


def given_quadrants(dim: int, quadrants: int) -> torch.Tensor:
    """The ``(dim,)`` bool mask of the given pixels of a square image flattened row by row:
    1 quadrant the bottom-left, 2 the left half, 3 all but the bottom-right."""
    side = math.isqrt(dim)
    if side * side != dim or side % 2:
        raise PyrovaeError(f"quadrant completion needs square images of even side, got {dim} values per example")
    if quadrants not in (1, 2, 3):
        raise PyrovaeError(f"quadrants must be 1, 2 or 3 (given), got {quadrants}")
    h = side // 2
    given = torch.zeros(side, side, dtype=torch.bool)
    given[h:, :h] = True
    if quadrants >= 2:
        given[:, :h] = True
    if quadrants == 3:
        given[:h, :] = True
    return given.flatten()


class Completion(dist.TorchDistribution):
    """A whole example whose ``given`` values are known: a point mass on ``known`` there, and a
    factorized ``base`` (an ``Independent`` over the last dim) on the other values.

    log p(x) = sum over the missing d of log base_d(x_d), and -inf where x differs from ``known``
    on a given value; ``mean`` and ``sample`` keep the known values (completed images).
    """

    arg_constraints: dict = {}

    def __init__(self, base: dist.Independent, given: torch.Tensor, known: torch.Tensor, validate_args: bool | None = None) -> None:
        self.base, self.given, self.known = base, given, known
        batch_shape = torch.broadcast_shapes(base.batch_shape, known.shape[:-1])
        super().__init__(batch_shape, base.event_shape, validate_args=False)

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        return self.base.support

    def expand(self, batch_shape: torch.Size, _instance: object = None) -> Completion:
        batch_shape = torch.Size(batch_shape)
        return Completion(self.base.expand(batch_shape), self.given, self.known.expand(batch_shape + self.event_shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        missing = (~self.given).to(value.dtype)
        scored = (self.base.base_dist.log_prob(value) * missing).sum(-1)
        agrees = ((value == self.known) | ~self.given).all(-1)
        return torch.where(agrees, scored, scored.new_tensor(-math.inf))

    @property
    def mean(self) -> torch.Tensor:
        return torch.where(self.given, self.known, self.base.mean)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return torch.where(self.given, self.known, self.base.sample(sample_shape))


class _Completing(DecoderMixin, nn.Module):
    """What both models share: the quadrant split and p(x_out | features) as a `Completion`."""

    scores = "log p(x_out | x_in)"  # what pyrovae's log-likelihood figures of these models are

    def split_image(self, data_shape: Sequence[int], quadrants: int) -> None:
        self.data_shape = torch.Size(data_shape)
        self.quadrants = quadrants
        self.register_buffer("given", given_quadrants(math.prod(self.data_shape), quadrants))
        self.inputs = int(self.given.sum())

    def observed(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), -1)

    def condition(self, x: torch.Tensor) -> torch.Tensor:
        """x_in: the given values of each example, (B, inputs)."""
        return self.observed(x)[:, self.given].float()

    def complete(self, features: torch.Tensor, x: torch.Tensor) -> Completion:
        return Completion(self.decode(features), self.given, self.observed(x))

    def check_data(self, x: torch.Tensor) -> None:
        self.likelihood.check(x)


@MODELS.register("cvae", "conditional VAE p(x_out|x_in,z) p(z|x_in) for quadrant completion (Sohn et al. 2015)")
class CVAE(_Completing):
    """The conditional VAE of Sohn et al. (2015) on image completion: a prior network p(z | x_in),
    a generation network p(x_out | x_in, z) (MLPs), trained with a recognition model q(z | x).

    Args:
        data_shape: the event shape of one (square) image.
        latent: size of z.
        hidden: hidden sizes of the prior and generation networks.
        activation: nonlinearity name.
        likelihood: the head of p(x_out | x_in, z) (a factorized one: bernoulli, gaussian, ...).
        quadrants: how many quadrants are given (1, 2 or 3).
        gsnn: weight of the GSNN term E_p(z|x_in)[log p(x_out | x_in, z)] added in training
            (Sohn et al.'s hybrid objective alpha L_CVAE + (1 - alpha) L_GSNN is, up to the
            factor alpha, gsnn = (1 - alpha) / alpha). Evaluation scores the model alone.

    References:
        Sohn, Lee & Yan (2015), Learning Structured Output Representation using Deep Conditional
        Generative Models, sec. 4 (eq. 4-5; the hybrid objective, eq. 7; the CLL, eq. 6).
    """

    def __init__(self, data_shape: Sequence[int], latent: int = 50, hidden: Sequence[int] = (500, 500), activation: str = "relu",
                 likelihood: str = "bernoulli", quadrants: int = 1, gsnn: float = 0.0) -> None:
        super().__init__()
        if latent < 1 or any(h < 1 for h in hidden):
            raise PyrovaeError("cvae needs a positive --latent and --hidden sizes")
        if not (math.isfinite(gsnn) and gsnn >= 0):
            raise PyrovaeError(f"cvae's gsnn weight must be >= 0, got {gsnn}")
        self.split_image(data_shape, quadrants)
        self.latent, self.gsnn = latent, float(gsnn)
        self.prior_net = MLP(self.inputs, list(hidden), 2 * latent, activation)
        self.build_decoder("mlp", self.inputs + latent, self.data_shape, hidden, activation, likelihood)

    def prior(self, x: torch.Tensor) -> dist.Normal:
        """p(z | x_in), a diagonal Gaussian."""
        loc, raw = self.prior_net(self.condition(x)).chunk(2, -1)
        return dist.Normal(loc, nn.functional.softplus(raw) + 1e-4)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> None:
        register("cvae", self)
        condition, prior = self.condition(x), self.prior(x)
        with data_plate(x, index, size):
            z = pyro.sample("z", prior.to_event(1))
            pyro.sample("x", self.complete(broadcast_cat(condition, z), x), obs=self.observed(x))
            if self.training and self.gsnn:
                guess = prior.rsample()  # z ~ p(z | x_in): the GSNN's own draw, no recognition model
                pyro.factor("gsnn", self.gsnn * self.complete(broadcast_cat(condition, guess), x).log_prob(self.observed(x)))


@MODELS.register("completion-nn", "deterministic baseline p(x_out|x_in) of one network for quadrant completion (Sohn et al. 2015)")
class CompletionNet(_Completing):
    """p(x_out | x_in) from one MLP of the given quadrants: the plain network baseline of Sohn et
    al. (2015), exact; train it with ``--guide none``.

    Args:
        data_shape: the event shape of one (square) image.
        hidden: hidden sizes.
        activation: nonlinearity name.
        likelihood: the head of p(x_out | x_in).
        quadrants: how many quadrants are given (1, 2 or 3).
    """

    def __init__(self, data_shape: Sequence[int], hidden: Sequence[int] = (500, 500), activation: str = "relu",
                 likelihood: str = "bernoulli", quadrants: int = 1) -> None:
        super().__init__()
        self.split_image(data_shape, quadrants)
        self.build_decoder("mlp", self.inputs, self.data_shape, hidden, activation, likelihood)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> None:
        register("completion_nn", self)
        with data_plate(x, index, size):
            pyro.sample("x", self.complete(self.condition(x), x), obs=self.observed(x))
