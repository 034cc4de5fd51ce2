"""FactorVAE: amortized VI with a discriminator's estimate of the total correlation of q(z)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pyro import poutine
from torch.nn import functional as F

from pyrovae.batch import Data, as_batch
from pyrovae.config import check_number
from pyrovae.infer.adversarial import Adversarial, flat_codes
from pyrovae.infer.base import TrainSettings
from pyrovae.registry import METHODS

__all__ = ["FactorVAE", "permute_dims"]


def permute_dims(codes: torch.Tensor) -> torch.Tensor:
    """Each column of ``(B, D)`` codes shuffled across the minibatch on its own: samples of the
    product of q(z)'s marginals (Kim & Mnih 2018, Algorithm 1)."""
    order = torch.argsort(torch.rand(codes.shape, device=codes.device), dim=0)
    return torch.gather(codes, 0, order)


@METHODS.register("factor-vae", "FactorVAE: amortized VI less gamma times a discriminator's total correlation of q(z) (Kim & Mnih 2018); "
                  "--method-option gamma=40")
class FactorVAE(Adversarial):
    """Amortized VI on the ELBO less ``gamma`` times the total correlation TC(q(z)) =
    KL(q(z) || prod_d q(z_d)), estimated by a discriminator (the critic) trained alongside to
    tell codes of the minibatch (joint, class 0) from codes shuffled per dimension
    (`permute_dims`, class 1): TC ~ E[logit_joint - logit_product]. Each step takes one Adam step
    of model and guide on that loss, then one of the critic on its cross-entropy, at the same
    minibatch's (detached) codes. The codes are every latent site's draw, flattened.

    Options (``--method-option``): ``gamma`` (default 40, in Locatello et al.'s grid of 10 to
    100), ``critic_lr`` (1e-4, Adam with betas (0.5, 0.9) as Kim & Mnih), ``hidden`` (1000) and
    ``layers`` (6) of the critic, ``clip_norm``. Kim & Mnih draw the shuffled codes from a second
    minibatch; here they come from the same one, so a step costs one pass of the program, not two.

    References:
        Kim & Mnih (2018), Disentangling by Factorising, ICML, sec. 3 and Algorithm 2.
    """

    name = "factor-vae"
    critic_outputs = 2
    uses_objective = True

    def __init__(self, model: Callable, guide: Callable, settings: TrainSettings, num_examples: int, *, gamma: float = 40.0,
                 hidden: int = 1000, layers: int = 6, **options: Any) -> None:
        super().__init__(model, guide, settings, num_examples, hidden=hidden, layers=layers, **options)
        self.gamma = check_number(self.name, "gamma", gamma, positive=False)

    def step(self, x: Data, index: torch.Tensor, beta: float = 1.0, weights: torch.Tensor | None = None) -> torch.Tensor:
        """One Adam step of model and guide on -ELBO + gamma TC (nats per example), then one of the critic."""
        first = self.begin(x, weights)
        assert self.critic is not None and self.sites is not None
        recorder = poutine.trace(self.guide)
        self.optimizer.zero_grad(set_to_none=True)
        with self.fast_path():
            bound = self.loss(x, index, beta, guide=recorder)
        codes = flat_codes(recorder.msngr.trace, self.sites, len(as_batch(x)), self.name)
        logits = self.critic.network(codes)
        loss = bound + self.gamma * (logits[:, 0] - logits[:, 1]).mean()
        loss.backward()
        self.finish(loss, first)
        self.critic_step(codes.detach())
        return loss.detach()

    def critic_step(self, codes: torch.Tensor) -> None:
        """One Adam step of the critic: joint codes are class 0, shuffled ones class 1."""
        assert self.critic is not None
        joint, product = self.critic.network(codes), self.critic.network(permute_dims(codes))
        zeros = torch.zeros(len(codes), dtype=torch.long, device=codes.device)
        self.critic.step(0.5 * (F.cross_entropy(joint, zeros) + F.cross_entropy(product, zeros + 1)))
