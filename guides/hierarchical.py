"""Guides for models with stochastic layers z_1 (nearest x) .. z_L: bottom-up and top-down (sec. 4.1-4.2).

`bottom-up`: q(z_1|x) q(z_2|z_1) ... q(z_L|z_{L-1}), the recognition model of the two-layer
VAE of Burda et al. (2016). It runs against the generative direction.

`top-down`: ladder-VAE inference (Sønderby et al. 2016). A deterministic bottom-up pass
d_1 = f_1(x), d_i = f_i(d_{i-1}) gives per-layer Gaussian "likelihood" terms N(mu_i, s_i^2);
sampling then goes top-down in the model's own order, and each q(z_i | z_{i+1}, x) is the
precision-weighted product of that term with the *model's* conditional p(z_i | z_{i+1}),
whose networks are shared with the generative model (not copied): the gradient of the guide
reaches the model's top-down path, as in the LVAE.

Training needs the decoder started at the data's marginal (`init_from_data`, which `fit`
applies): from PyTorch's default initialization, on static binarized MNIST with tanh MLPs and
Adam 1e-3, this guide collapsed within about 50 steps (the decoder ignored z, ELBO = log p(x)
= -207 nats) with or without KL warm-up or free bits. Sønderby et al. train with batch
normalization and 200 epochs of warm-up instead.

Why `elbo-analytic` (Pyro's TraceMeanField_ELBO) is refused for `bottom-up`: it replaces each
site's log q(z_i|.) - log p(z_i|.) by KL(q(z_i|.) || p(z_i|.)) with the *other* sites held at
their sampled values. That is the chain rule of KL only if, under q, the parents of z_i in the
model are sampled *before* z_i and independently of z_i given them. In the bottom-up guide the
model's parent of z_1, namely z_2, is drawn from q(z_2|z_1) *after and dependent on* z_1, so
E_q[KL(q(z_1|x) || p(z_1|z_2))] (z_2 from its q-marginal, integrating z_1 afresh) differs
from E_q[log q(z_1|x) - log p(z_1|z_2)]: the estimate is biased and no longer a bound. The
top-down guide samples z_L first and each z_i given z_{i+1}, exactly the model's order, so
the per-site analytic KLs are the exact chain-rule decomposition; a mean-field guide
(`diagonal`: every q(z_i|x) from x alone) is fine too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn
from torch.nn.functional import softplus

from pyrovae.conv import ConvEncoder
from pyrovae.errors import PyrovaeError
from pyrovae.guides.flows import Reverse
from pyrovae.nets import MLP
from pyrovae.nets import activation as make_activation
from pyrovae.registry import GUIDES
from pyrovae.sites import ModelSites, primary, register

__all__ = ["BottomUpGuide", "TopDownGuide", "layer_sizes"]


def layer_sizes(sites: ModelSites) -> list[int] | str:
    """Sizes of z1..zL from the model's sites, or why the sites are not such a chain."""
    names = list(sites.latents)
    if not names:
        return "the model has no latent sites (use --guide none)"
    if names == ["z"]:
        names_sorted = ["z"]
    else:
        if not all(re.fullmatch(r"z[1-9][0-9]*", n) for n in names):
            return f"it needs latent sites named z1..zL, but the model has {', '.join(names)}"
        names_sorted = sorted(names, key=lambda n: int(n[1:]))
        if names_sorted != [f"z{i}" for i in range(1, len(names) + 1)]:
            return f"it needs latent sites z1..zL without gaps, but the model has {', '.join(names)}"
    shapes = [sites.latents[n] for n in names_sorted]
    if any(len(s) != 1 for s in shapes):
        return "it needs vector latents (event dim 1)"
    return [s[0] for s in shapes]


def _trunk(kind: str, data_shape: Sequence[int], hidden: list[int], act: str) -> nn.Module:
    dim = int(torch.Size(data_shape).numel())
    if kind == "mlp":
        return nn.Sequential(MLP(dim, hidden[:-1], hidden[-1], act), make_activation(act))
    if kind == "conv":
        return nn.Sequential(ConvEncoder(data_shape, hidden[-1]), make_activation(act))
    raise PyrovaeError(f"unknown encoder {kind!r}: choose mlp or conv")


class _Gaussian(nn.Module):
    """A linear head to (loc, scale) of a diagonal Gaussian."""

    min_scale = 1e-4

    def __init__(self, features: int, size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 2 * size)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = self.linear(h).chunk(2, dim=-1)
        return loc, softplus(raw) + self.min_scale


@GUIDES.register("bottom-up", "q(z1|x) q(z2|z1) ... q(zL|zL-1) for layered models (Burda et al. 2016); no elbo-analytic")
class BottomUpGuide(nn.Module):
    """Each layer's posterior from the layer below it: q(z_1|x), q(z_{i+1}|z_i).

    Works with any model whose latent sites are z1..zL (or a single z) with vector shapes.

    Options: encoder ("mlp" or "conv": the trunk of q(z_1|x)).

    References:
        Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders, sec. 5;
        Kingma & Welling (2019), sec. 4.2 (bottom-up inference).
    """

    analytic_kl: ClassVar[bool] = False  # see the module docstring; True on an instance with one layer
    gives_elbo: ClassVar[bool] = True
    latent_shapes: ClassVar[str] = "vector sites z1..zL (or one z)"

    def __init__(self, sites: ModelSites, data_shape: Sequence[int], hidden: Sequence[int] = (200, 200), activation: str = "tanh", encoder: str = "mlp") -> None:
        super().__init__()
        self.sites = sites
        sizes = layer_sizes(sites)
        if isinstance(sizes, str):
            raise PyrovaeError(sizes)
        hidden = list(hidden) or [64]
        self.sizes = sizes
        self.analytic_kl = len(sizes) == 1  # one layer: a plain diagonal Gaussian q(z|x)
        self.names = ["z"] if list(sites.latents) == ["z"] else [f"z{i}" for i in range(1, len(sizes) + 1)]
        self.trunk = _trunk(encoder, data_shape, hidden, activation)
        self.first = _Gaussian(hidden[-1], sizes[0])
        self.up = nn.ModuleList(
            nn.Sequential(MLP(sizes[i], hidden[:-1], hidden[-1], activation), make_activation(activation), _Gaussian(hidden[-1], sizes[i + 1]))
            for i in range(len(sizes) - 1)
        )

    @classmethod
    def supports(cls, model: Callable, sites: ModelSites) -> str | None:
        sizes = layer_sizes(sites)
        return sizes if isinstance(sizes, str) else None

    def forward(self, *args: Any, index: torch.Tensor | None = None, size: int | None = None, **kwargs: Any) -> None:
        x = primary(args, kwargs)
        register("guide", self)
        loc, scale = self.first(self.trunk(x.reshape(len(x), -1)))
        with self.sites.plate_for(x, index, size):
            z = pyro.sample(self.names[0], dist.Normal(loc, scale).to_event(1))
            for name, net in zip(self.names[1:], self.up):
                loc, scale = net(z)
                z = pyro.sample(name, dist.Normal(loc, scale).to_event(1))


@GUIDES.register("top-down", "ladder-VAE inference: bottom-up features, top-down sampling sharing the model's conditionals (Sønderby et al. 2016)")
class TopDownGuide(nn.Module):
    """q(z_L|x) prod_i q(z_i | z_{i+1}, x), precision-weighted with the model's p(z_i | z_{i+1}).

    For i < L: 1/s_q^2 = 1/s_hat_i^2 + 1/s_p^2 and mu_q = s_q^2 (mu_hat_i / s_hat_i^2 + mu_p / s_p^2),
    with (mu_p, s_p) = the model's `conditional_params(i, z_{i+1})`; q(z_L|x) = N(mu_hat_L, s_hat_L^2).
    The model must expose `layers` and `conditional_params` (the `hierarchical` model does);
    it is held by reference, not as a submodule (its parameters stay the model's).

    Options: encoder ("mlp" or "conv": the trunk of the first deterministic layer);
    flow_steps (0: none; T > 0 adds T IAF steps per layer on top of each precision-weighted
    Gaussian, conditioned on that layer's bottom-up features, reversing the order between
    steps, as in the bidirectional IAF-VAE of Kingma et al. 2016); flow_hidden (MADE sizes,
    default [10 d, 10 d] with d >= the layer size).

    References:
        Sønderby, Raiko, Maaløe, Sønderby & Winther (2016), Ladder Variational Autoencoders,
        sec. 2.2, eq. 17-19; Kingma et al. (2016), Improving Variational Inference with Inverse
        Autoregressive Flow, sec. 4 and appendix C; Kingma & Welling (2019), sec. 4.2.
    """

    analytic_kl: ClassVar[bool] = True
    gives_elbo: ClassVar[bool] = True
    latent_shapes: ClassVar[str] = "the hierarchical model's vector sites z1..zL"

    def __init__(
        self, sites: ModelSites, data_shape: Sequence[int], hidden: Sequence[int] = (200, 200), activation: str = "tanh",
        model: Any = None, encoder: str = "mlp", flow_steps: int = 0, flow_hidden: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.sites = sites
        reason = self.supports(model, sites)
        if reason:
            raise PyrovaeError(reason)
        if flow_steps < 0:
            raise PyrovaeError(f"flow_steps must be >= 0, got {flow_steps}")
        hidden = list(hidden) or [64]
        self.sizes = layer_sizes(sites)
        self._model = (model,)  # a reference: not a submodule
        self.trunks = nn.ModuleList([_trunk(encoder, data_shape, hidden, activation)])
        for _ in range(len(self.sizes) - 1):
            self.trunks.append(nn.Sequential(MLP(hidden[-1], hidden[:-1], hidden[-1], activation), make_activation(activation)))
        self.heads = nn.ModuleList(_Gaussian(hidden[-1], s) for s in self.sizes)
        self.flows = nn.ModuleList(_iaf_steps(s, hidden[-1], flow_steps, flow_hidden) for s in self.sizes)

    @property
    def model(self) -> Any:
        return self._model[0]

    @classmethod
    def supports(cls, model: Callable, sites: ModelSites) -> str | None:
        if model is None or not hasattr(model, "conditional_params") or not hasattr(model, "layers"):
            return "it shares the model's top-down conditionals: the model must expose `layers` and `conditional_params` (use --model hierarchical)"
        sizes = layer_sizes(sites)
        if isinstance(sizes, str):
            return sizes
        if len(sizes) != model.layers:
            return f"the model has {model.layers} layers but {len(sizes)} latent sites"
        return None

    def bottom_up(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(mu_hat_i, s_hat_i, d_i) for i = 1..L from the deterministic bottom-up pass."""
        h = x.reshape(len(x), -1)
        out = []
        for trunk, head in zip(self.trunks, self.heads):
            h = trunk(h)
            out.append((*head(h), h))
        return out

    def layer(self, i: int, loc: torch.Tensor, scale: torch.Tensor, features: torch.Tensor) -> dist.Distribution:
        """q(z_i | ...): the Gaussian, then layer i's IAF steps conditioned on its features."""
        q = dist.Normal(loc, scale).to_event(1)
        steps = self.flows[i - 1]
        if len(steps) == 0:
            return q
        return dist.TransformedDistribution(q, [step.condition(features) if hasattr(step, "condition") else step for step in steps])

    def forward(self, *args: Any, index: torch.Tensor | None = None, size: int | None = None, **kwargs: Any) -> None:
        x = primary(args, kwargs)
        register("guide", self)
        terms = self.bottom_up(x)
        layers = len(self.sizes)
        with self.sites.plate_for(x, index, size):
            loc, scale, features = terms[-1]
            z = pyro.sample(f"z{layers}", self.layer(layers, loc, scale, features))
            for i in range(layers - 1, 0, -1):
                mu_hat, s_hat, features = terms[i - 1]
                mu_p, s_p = self.model.conditional_params(i, z)
                precision_hat, precision_p = s_hat.pow(-2), s_p.pow(-2)
                variance = 1.0 / (precision_hat + precision_p)
                loc = variance * (mu_hat * precision_hat + mu_p * precision_p)
                z = pyro.sample(f"z{i}", self.layer(i, loc, variance.sqrt(), features))


def _iaf_steps(dim: int, context: int, steps: int, hidden: Sequence[int] | None) -> nn.ModuleList:
    """`steps` conditional IAF steps on a layer of size `dim`, reversed between steps (empty if 0)."""
    hidden = [int(h) for h in hidden] if hidden else [10 * dim, 10 * dim]
    if steps and min(hidden) < dim:
        raise PyrovaeError(f"flow_hidden {hidden} must be at least the layer size {dim}")
    out: list[nn.Module] = []
    for k in range(steps):
        if k:
            out.append(Reverse(dim))
        made = ConditionalAutoRegressiveNN(dim, context, hidden, permutation=torch.arange(dim))
        out.append(ConditionalAffineAutoregressive(made, stable=True))
    return nn.ModuleList(out)
