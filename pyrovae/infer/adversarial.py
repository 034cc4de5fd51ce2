"""Adversarial training beside SVI: a critic (discriminator with its own optimizer), the
adversarial autoencoder and VAE-GAN, each an inference method with the common interface.

Each step first updates model and guide on their loss, then the critic on its own, at the same
minibatch: every optimizer holds only its own parameters, and the checkpoint holds all three.
The losses are not bounds on log p(x); the model still defines p(x) = E_p(z)[p(x|z)], so a run
is scored by importance sampling with its guide like any other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pyro import poutine
from torch import nn
from torch.nn import functional as F

from pyrovae import distributed
from pyrovae.batch import Data, as_batch
from pyrovae.config import check_number, is_integer
from pyrovae.errors import PyrovaeError
from pyrovae.infer.amortized import AmortizedVI
from pyrovae.infer.base import TrainSettings, unique_parameters
from pyrovae.registry import METHODS
from pyrovae.sampling import data_site
from pyrovae.sites import ModelSites

__all__ = ["Adversarial", "AdversarialAE", "Critic", "VAEGAN", "flat_codes", "mlp"]


def mlp(sizes: Sequence[int], outputs: int) -> nn.Sequential:
    """Linear layers of `sizes`, leaky ReLUs of slope 0.2 between them, then `outputs` logits."""
    blocks: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        blocks += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
    return nn.Sequential(*blocks, nn.Linear(sizes[-1], outputs))


class Critic:
    """A discriminator network and its Adam; `step(loss)` moves the network only."""

    def __init__(self, network: nn.Sequential, lr: float, betas: tuple[float, float] = (0.5, 0.9)) -> None:
        self.network = network
        self.optimizer = torch.optim.Adam(network.parameters(), lr=lr, betas=betas)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.network.parameters())

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])


def flat_codes(trace: Any, sites: ModelSites, batch: int, what: str) -> torch.Tensor:
    """The draw of every latent site in a trace, one row per example ``(B, D)``."""
    try:
        return torch.cat([trace.nodes[name]["value"].reshape(batch, -1) for name in sites.latents], dim=-1)
    except (KeyError, RuntimeError) as error:
        raise PyrovaeError(f"{what} could not read one code per example from the draw: {error}") from None


class Adversarial(AmortizedVI):
    """Amortized VI's optimizer and checkpoints, with a critic that `prepare` builds (it reads
    the model's sites and the data's shape)."""

    gives_elbo = False
    trains_baselines = False
    critic_outputs = 1  # logits
    uses_objective = False  # its loss is its own (AAE, VAE-GAN), or the objective's plus a critic's term (FactorVAE)

    def __init__(self, model: Callable, guide: Callable, settings: TrainSettings, num_examples: int, *, sites: ModelSites | None = None,
                 critic_lr: float = 1e-4, hidden: int = 512, layers: int = 2, clip_norm: float | None = None) -> None:
        super().__init__(model, guide, settings, num_examples, sites=sites, clip_norm=clip_norm)
        self.critic_lr = check_number(self.name, "critic_lr", critic_lr)
        if not (is_integer(hidden) and hidden >= 1 and is_integer(layers) and layers >= 1):
            raise PyrovaeError(f"{self.name} options hidden and layers must be positive whole numbers, got {hidden!r} and {layers!r}")
        if settings.particles != 1:
            raise PyrovaeError(f"{self.name} trains on one draw per example, got --particles {settings.particles}")
        self.hidden, self.layers = hidden, layers
        self.captured = None  # every step also trains the critic on the step's own draws
        self.critic: Critic | None = None
        if not self.uses_objective and (settings.objective != "elbo" or settings.objective_options):
            raise PyrovaeError(f"the {self.name} method trains on a loss of its own, not --objective {settings.objective}: drop --objective")

    def critic_input(self, sites: ModelSites, batch: Any) -> int:
        """The width of what the critic reads: codes, or images."""
        return sum(math.prod(shape) for shape in sites.latents.values())

    def prepare(self, data: Data) -> None:
        super().prepare(data)
        if self.critic is None:
            assert self.sites is not None
            if self.sites.global_latents or self.sites.discrete or self.sites.enumerated:
                raise PyrovaeError(f"{self.name} needs per-example, continuous latents only")
            device = next((p.device for p in self.parameters()), torch.device("cpu"))
            sizes = [self.critic_input(self.sites, as_batch(data))] + [self.hidden] * self.layers
            self.critic = Critic(mlp(sizes, self.critic_outputs).to(device), self.critic_lr)

    def parameters(self) -> list[torch.Tensor]:
        return [*super().parameters(), *(self.critic.parameters() if self.critic is not None else [])]

    def begin(self, x: Data, weights: torch.Tensor | None) -> bool:
        """Prepare on the first step (returned True then); stratified weights are refused."""
        if weights is not None:
            raise PyrovaeError(f"{self.name} trains on uniform minibatches: drop --labelled-per-batch")
        first = not self.prepared
        self.prepare(x)
        return first

    def traces(self, x: Data, index: torch.Tensor | None) -> tuple[Any, Any, Any, int]:
        """The guide's trace, the model's replayed on it, the model's own (z ~ p(z)), and B."""
        batch = as_batch(x)
        kwargs, _ = self.minibatch_kwargs(batch, index)
        args, call_kwargs = batch.call_args()
        guide_trace = poutine.trace(self.guide).get_trace(*args, **call_kwargs, **kwargs)
        model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(*args, **call_kwargs, **kwargs)
        prior_trace = poutine.trace(self.model).get_trace(*args, **call_kwargs, **kwargs)
        return guide_trace, model_trace, prior_trace, len(batch)

    def finish(self, loss: torch.Tensor, first: bool) -> None:
        """Check (on the first step: every tensor the loss reaches is trained or checkpointed),
        clip and apply the gradients model and guide hold."""
        if first:
            self.check_complete(loss)
        if self.clip_norm is not None:
            distributed.average_now(self.optimizer)  # across data-parallel ranks: the norm is the whole minibatch's
            torch.nn.utils.clip_grad_norm_([p for group in self.optimizer.param_groups for p in group["params"]], self.clip_norm)
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        return state if self.critic is None else {**state, "critic": self.critic.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if ("critic" in state) != (self.critic is not None):
            raise RuntimeError("this state and this method differ in having a critic: call prepare(data) before load_state_dict")
        super().load_state_dict(state)
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])


def _log_likelihood(trace: Any, sites: ModelSites, batch: int) -> torch.Tensor:
    """Per-example log p(x | z) of the observed sites of a model trace ``(B,)``."""
    total = 0.0
    for name in sites.observed:
        site = trace.nodes[name]
        total = total + site["fn"].log_prob(site["value"]).reshape(batch, -1).sum(-1)
    assert torch.is_tensor(total)
    return total


@METHODS.register("aae", "adversarial autoencoder: reconstruction plus a critic matching the aggregate posterior to the prior (Makhzani et al. 2016)")
class AdversarialAE(Adversarial):
    """The adversarial autoencoder: model and guide minimize the reconstruction term
    -E_q[log p(x|z)] plus ``weight`` times the non-saturating generator loss -log D(z) of a
    critic D trained to tell prior draws z ~ p(z) (class 1) from the guide's codes (class 0), so
    that the aggregate posterior q(z) is pushed to the prior instead of each q(z|x) (no KL term).
    KL warm-up's beta scales the adversarial term.

    Options (``--method-option``): ``weight`` (1), ``critic_lr`` (1e-4), ``hidden`` (512) and
    ``layers`` (2) of the critic, ``clip_norm``.

    References:
        Makhzani, Shlens, Jaitly, Goodfellow & Frey (2016), Adversarial Autoencoders, ICLR
        workshop, sec. 2 (the reconstruction and regularization phases).
    """

    name = "aae"

    def __init__(self, model: Callable, guide: Callable, settings: TrainSettings, num_examples: int, *, weight: float = 1.0, **options: Any) -> None:
        super().__init__(model, guide, settings, num_examples, **options)
        self.weight = check_number(self.name, "weight", weight, positive=False)

    def step(self, x: Data, index: torch.Tensor, beta: float = 1.0, weights: torch.Tensor | None = None) -> torch.Tensor:
        first = self.begin(x, weights)
        assert self.critic is not None and self.sites is not None
        guide_trace, model_trace, prior_trace, batch = self.traces(x, index)
        codes = flat_codes(guide_trace, self.sites, batch, self.name)
        prior = flat_codes(prior_trace, self.sites, batch, self.name).detach()
        reconstruction = -_log_likelihood(model_trace, self.sites, batch).mean()
        fooling = F.binary_cross_entropy_with_logits(self.critic.network(codes), torch.ones(batch, 1, device=codes.device))
        loss = reconstruction + beta * self.weight * fooling
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.finish(loss, first)
        logits = self.critic.network(torch.cat([prior, codes.detach()]))
        labels = torch.cat([torch.ones(batch, 1), torch.zeros(batch, 1)]).to(logits.device)
        self.critic.step(F.binary_cross_entropy_with_logits(logits, labels))
        return loss.detach()


@METHODS.register("vae-gan", "VAE-GAN: the encoder on KL plus a critic's feature reconstruction, the decoder against the critic (Larsen et al. 2016)")
class VAEGAN(Adversarial):
    """VAE-GAN: reconstructions are compared in the critic's hidden features, not in pixels.

    With x~ the decoded mean at z ~ q(z|x), x_p that at z ~ p(z), and Dis_l the critic's last
    hidden layer: L_prior = log q(z|x) - log p(z) (the KL at the draw), L_like =
    ||Dis_l(x~) - Dis_l(x)||^2 / 2 per example, and the critic's GAN loss on x (real) against x~
    and x_p (fake). The guide descends L_prior + L_like, the model gamma L_like plus the
    non-saturating generator loss on x~ and x_p, the critic its GAN loss; each takes its own
    gradient (Larsen et al.'s Algorithm 1). KL warm-up's beta scales L_prior. The model's pixel
    likelihood is not what trains it, but defines the p(x) it is scored by.

    Options (``--method-option``): ``gamma``, the weight of L_like against the GAN term in the
    decoder's loss (1), ``critic_lr`` (1e-4), ``hidden`` (512) and ``layers`` (2) of the critic, ``clip_norm``.

    References:
        Larsen, Sonderby, Larochelle & Winther (2016), Autoencoding beyond pixels using a learned
        similarity metric, ICML, sec. 2 and Algorithm 1.
    """

    name = "vae-gan"

    def __init__(self, model: Callable, guide: Callable, settings: TrainSettings, num_examples: int, *, gamma: float = 1.0, **options: Any) -> None:
        super().__init__(model, guide, settings, num_examples, **options)
        self.gamma = check_number(self.name, "gamma", gamma, positive=False)
        theta = {id(p) for p in unique_parameters(model)}
        self.decoder_parameters: list[torch.Tensor] = list(unique_parameters(model))
        self.encoder_parameters: list[torch.Tensor] = [p for p in unique_parameters(guide) if id(p) not in theta]
        self.observed: str | None = None

    def add_parameters(self, model: list[torch.Tensor], guide: list[torch.Tensor]) -> None:
        self.decoder_parameters += model
        self.encoder_parameters += guide
        super().add_parameters(model, guide)

    def critic_input(self, sites: ModelSites, batch: Any) -> int:
        return math.prod(batch.primary.shape[1:])  # the critic reads images

    def prepare(self, data: Data) -> None:
        if self.observed is None:
            self.observed = data_site(self.model, as_batch(data)[:2])  # the site that scores the images
        super().prepare(data)
        if not self.decoder_parameters or not self.encoder_parameters:
            raise PyrovaeError("vae-gan updates a decoder and an encoder apart: model and guide must each hold parameters")

    def _features_and_logit(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.critic is not None
        hidden = self.critic.network[:-1](images.reshape(len(images), -1))
        return hidden, self.critic.network[-1](hidden)

    def step(self, x: Data, index: torch.Tensor, beta: float = 1.0, weights: torch.Tensor | None = None) -> torch.Tensor:
        first = self.begin(x, weights)
        assert self.critic is not None and self.sites is not None and self.observed is not None
        guide_trace, model_trace, prior_trace, batch = self.traces(x, index)
        real = as_batch(x).primary.reshape(batch, -1)
        decoded = model_trace.nodes[self.observed]["fn"].mean.reshape(batch, -1)
        generated = prior_trace.nodes[self.observed]["fn"].mean.reshape(batch, -1)
        kl = 0.0
        for name in self.sites.latents:
            q, p = guide_trace.nodes[name], model_trace.nodes[name]
            kl = kl + (q["fn"].log_prob(q["value"]) - p["fn"].log_prob(p["value"])).reshape(batch, -1).sum(-1)
        assert torch.is_tensor(kl)
        real_features, _ = self._features_and_logit(real)
        decoded_features, decoded_logit = self._features_and_logit(decoded)
        _, generated_logit = self._features_and_logit(generated)
        like = 0.5 * (decoded_features - real_features.detach()).pow(2).sum(-1).mean()
        ones = torch.ones(batch, 1, device=real.device)
        fooling = F.binary_cross_entropy_with_logits(decoded_logit, ones) + F.binary_cross_entropy_with_logits(generated_logit, ones)
        encoder_loss = beta * kl.mean() + like
        decoder_loss = self.gamma * like + fooling
        self.optimizer.zero_grad(set_to_none=True)
        grads = torch.autograd.grad(encoder_loss, self.encoder_parameters, retain_graph=True, allow_unused=True)
        grads_decoder = torch.autograd.grad(decoder_loss, self.decoder_parameters, allow_unused=True)
        for p, g in [*zip(self.encoder_parameters, grads), *zip(self.decoder_parameters, grads_decoder)]:
            p.grad = g
        loss = encoder_loss + decoder_loss
        self.finish(loss, first)
        logits = self.critic.network(torch.cat([real, decoded.detach(), generated.detach()]))
        labels = torch.cat([ones, torch.zeros(2 * batch, 1, device=real.device)])
        self.critic.step(F.binary_cross_entropy_with_logits(logits, labels))
        return loss.detach()
