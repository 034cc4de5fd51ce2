"""The semi-supervised VAE M2 (Kingma et al. 2014): p(x|y,z) p(y) p(z) with a class y, given
where an example is labelled and summed out exactly where it is not (Kingma & Welling 2019,
sec. 1.1 and 4.5).

Labels are data (``--fields x,y``): ``y >= 0`` is a label, ``UNLABELLED`` (-1) marks an example
without one. The model samples y from its uniform prior; its guide (`pyrovae.guides.m2`)
proposes the label itself where there is one and the classifier q(y|x) where there is not,
enumerated in parallel, so that `elbo-enum` gives the M2 bound of each example exactly:

    labelled:    E_q(z|x,y)[log p(x|y,z)] + log p(y) - KL(q(z|x,y) || p(z))
    unlabelled:  sum_y q(y|x) [that bound of (x, y)] + H(q(y|x))

In training mode the model adds Kingma et al.'s classification term alpha * log q(y|x) on the
labelled examples (the classifier would otherwise learn from unlabelled data only); in
evaluation mode it is the generative model alone, so evaluation reports the bound itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import one_hot

from pyrovae.data import UNLABELLED
from pyrovae.errors import PyrovaeError
from pyrovae.models.vae import DecoderMixin
from pyrovae.nets import MLP, broadcast_cat
from pyrovae.registry import MODELS
from pyrovae.sites import data_plate, register

__all__ = ["ADGM", "M2", "UNLABELLED"]

@MODELS.register("m2", "semi-supervised VAE p(x|y,z) p(y) p(z), y given or summed out, with a classifier q(y|x) (Kingma et al. 2014)")
class M2(DecoderMixin, nn.Module):
    """M2 with an MLP decoder of [z, onehot(y)] and an MLP classifier q(y|x).

    Args:
        data_shape: the event shape of one example.
        latent: size of z.
        hidden: hidden sizes of the decoder and of the classifier.
        activation: nonlinearity name.
        likelihood: the head of p(x|y,z) (`pyrovae.registry.LIKELIHOODS`).
        classes: number of classes.
        alpha: weight of log q(y|x) per labelled example in training; None: 0.1 divided by the
            fraction of labelled training examples (Kingma et al.'s alpha = 0.1 N, spread over
            the labelled ones), set by `init_from_data`.

    References:
        Kingma, Rezende, Mohamed & Welling (2014), Semi-supervised Learning with Deep Generative
        Models, sec. 3.1.2 (M2) and eq. 9 (the classification term).
    """

    def __init__(self, data_shape: Sequence[int], latent: int = 50, hidden: Sequence[int] = (500,), activation: str = "softplus",
                 likelihood: str = "bernoulli", classes: int = 10, alpha: float | None = None) -> None:
        super().__init__()
        if latent < 1 or classes < 2 or any(h < 1 for h in hidden):
            raise PyrovaeError("m2 needs a positive --latent and --hidden sizes and at least 2 classes")
        if alpha is not None and not (math.isfinite(alpha) and alpha >= 0):
            raise PyrovaeError(f"m2's alpha must be >= 0, got {alpha}")
        self.data_shape, self.latent, self.classes, self.alpha = torch.Size(data_shape), latent, classes, alpha
        self.build_decoder("mlp", latent + classes, self.data_shape, hidden, activation, likelihood)
        self.classifier = MLP(math.prod(self.data_shape), list(hidden), classes, activation)

    def classify(self, x: torch.Tensor) -> dist.Categorical:
        """q(y|x): the classifier the guide proposes with, and predicts with."""
        return dist.Categorical(logits=self.classifier(x.reshape(len(x), -1).float()))

    @torch.no_grad()
    def init_from_data(self, batch: object) -> None:
        """The decoder starts at the data's marginal (`DecoderMixin`); alpha, where not given,
        from the fraction of labelled examples in `batch` (`pyrovae fit` passes the first
        10,000 training examples)."""
        args = getattr(batch, "args", ())
        if len(args) != 2:
            raise PyrovaeError("m2 takes labels as data: --fields x,y (and a data set with labels, e.g. --data-option labels=100)")
        x, y = args
        super().init_from_data(x)
        if self.alpha is None:
            labelled = (y >= 0).float().mean().item()
            self.alpha = 0.1 / labelled if labelled > 0 else 0.0

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> None:
        register("m2", self)
        if y.shape != x.shape[:1] or (y >= self.classes).any() or (y < UNLABELLED).any():
            raise PyrovaeError(f"m2's labels must be one per example in 0..{self.classes - 1}, or {UNLABELLED} for none")
        with data_plate(x, index, size):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            label = pyro.sample("y", dist.Categorical(logits=x.new_zeros(self.classes)))
            features = broadcast_cat(z, one_hot(label, self.classes).to(z))
            pyro.sample("x", self.decode(features), obs=x.reshape(len(x), -1))
            if self.training and self.alpha:
                labelled = y >= 0
                pyro.factor("classification", self.alpha * self.classify(x).log_prob(y.clamp(min=0)) * labelled)


@MODELS.register("adgm", "M2 with an auxiliary a: p(x|y,z) p(y) p(z) p(a|x,y,z), classifier q(y|a,x) (Maaloe et al. 2016)")
class ADGM(M2):
    """The auxiliary deep generative model: M2 extended by an auxiliary latent a, generated last
    by p(a|x,y,z) and inferred first by q(a|x), so that q(y,z|x) = E_q(a|x)[q(y|a,x) q(z|a,y,x)]
    is a mixture richer than M2's (its guide: `pyrovae.guides.m2.ADGMGuide`).

    The model holds q(a|x) and q(y|a,x) as M2 holds its classifier: ``classify(x)`` predicts
    with q(y| a = the mean of q(a|x), x), a deterministic classifier. In training mode the
    classification term is alpha log q(y|a,x) at the guide's draw of a, on labelled examples.

    Args:
        auxiliary: size of a (default: `latent`); the others as `M2`.

    References:
        Maaloe, Sonderby, Sonderby & Winther (2016), Auxiliary Deep Generative Models, sec. 2-3 (eq. 9-10).
    """

    min_scale = 1e-4

    def __init__(self, data_shape: Sequence[int], latent: int = 100, hidden: Sequence[int] = (500, 500), activation: str = "relu",
                 likelihood: str = "bernoulli", classes: int = 10, alpha: float | None = None, auxiliary: int | None = None) -> None:
        super().__init__(data_shape, latent, hidden, activation, likelihood, classes, alpha)
        self.auxiliary = auxiliary or latent
        if self.auxiliary < 1:
            raise PyrovaeError(f"adgm's auxiliary size must be positive, got {self.auxiliary}")
        pixels = math.prod(self.data_shape)
        self.aux_decoder = MLP(pixels + latent + classes, list(hidden), 2 * self.auxiliary, activation)  # p(a|x,y,z)
        self.aux_encoder = MLP(pixels, list(hidden), 2 * self.auxiliary, activation)  # q(a|x)
        self.classifier = MLP(pixels + self.auxiliary, list(hidden), classes, activation)  # q(y|a,x)

    def _gaussian(self, net: nn.Module, inputs: torch.Tensor) -> dist.Distribution:
        loc, raw = net(inputs).chunk(2, -1)
        return dist.Normal(loc, torch.nn.functional.softplus(raw) + self.min_scale).to_event(1)

    def auxiliary_posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(a|x)."""
        return self._gaussian(self.aux_encoder, x.reshape(len(x), -1).float())

    def classify_given(self, x: torch.Tensor, a: torch.Tensor) -> dist.Categorical:
        """q(y|a,x)."""
        return dist.Categorical(logits=self.classifier(broadcast_cat(x.reshape(len(x), -1).float(), a)))

    def classify(self, x: torch.Tensor) -> dist.Categorical:
        return self.classify_given(x, self.auxiliary_posterior(x).mean)

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> None:
        register("adgm", self)
        if y.shape != x.shape[:1] or (y >= self.classes).any() or (y < UNLABELLED).any():
            raise PyrovaeError(f"adgm's labels must be one per example in 0..{self.classes - 1}, or {UNLABELLED} for none")
        flat = x.reshape(len(x), -1)
        with data_plate(x, index, size):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            label = pyro.sample("y", dist.Categorical(logits=x.new_zeros(self.classes)))
            features = broadcast_cat(z, one_hot(label, self.classes).to(z))
            pyro.sample("x", self.decode(features), obs=flat)
            a = pyro.sample("a", self._gaussian(self.aux_decoder, broadcast_cat(flat.float(), features)))
            if self.training and self.alpha:
                labelled = y >= 0
                pyro.factor("classification", self.alpha * self.classify_given(x, a).log_prob(y.clamp(min=0)) * labelled)
