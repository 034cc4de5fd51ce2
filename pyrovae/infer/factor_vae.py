"""FactorVAE: amortized VI with a discriminator's estimate of the total correlation of q(z)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pyro import poutine
from torch import nn
from torch.nn import functional as F

from pyrovae.batch import Data, as_batch
from pyrovae.errors import PyrovaeError
from pyrovae.infer.amortized import AmortizedVI
from pyrovae.infer.base import TrainSettings
from pyrovae.registry import METHODS
from pyrovae.sites import ModelSites

__all__ = ["FactorVAE", "permute_dims"]


def permute_dims(codes: torch.Tensor) -> torch.Tensor:
    """Each column of ``(B, D)`` codes shuffled across the minibatch on its own: samples of the
    product of q(z)'s marginals (Kim & Mnih 2018, Algorithm 1)."""
    order = torch.argsort(torch.rand(codes.shape, device=codes.device), dim=0)
    return torch.gather(codes, 0, order)


def discriminator(dim: int, hidden: int, layers: int) -> nn.Sequential:
    """An MLP from codes to two logits (joint, product of marginals), leaky ReLUs of slope 0.2."""
    sizes = [dim] + [hidden] * layers
    blocks: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        blocks += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
    return nn.Sequential(*blocks, nn.Linear(sizes[-1], 2))


@METHODS.register("factor-vae", "FactorVAE: amortized VI less gamma times a discriminator's total correlation of q(z) (Kim & Mnih 2018); "
                  "--method-option gamma=40")
class FactorVAE(AmortizedVI):
    """Amortized VI on the ELBO less ``gamma`` times the total correlation TC(q(z)) =
    KL(q(z) || prod_d q(z_d)), estimated by a discriminator trained alongside to tell codes of
    the minibatch (joint) from codes shuffled per dimension (`permute_dims`): TC ~ E[logit_joint
    - logit_product]. Each step takes one Adam step of model and guide on that loss, then one of
    the discriminator on its cross-entropy, at the same minibatch's (detached) codes; each
    optimizer holds only its own parameters. The codes are every latent site's draw, flattened.

    Options (``--method-option``): ``gamma`` (default 40, in Locatello et al.'s grid of 10 to 100), ``discriminator_lr`` (1e-4, Adam with
    betas (0.5, 0.9) as Kim & Mnih), ``hidden`` (1000) and ``layers`` (6) of the discriminator,
    ``clip_norm``. Kim & Mnih draw the shuffled codes from a second minibatch; here they come
    from the same one, so a step costs one pass of the program, not two.

    References:
        Kim & Mnih (2018), Disentangling by Factorising, ICML, sec. 3 and Algorithm 2.
    """

    name = "factor-vae"
    trains_baselines = False

    def __init__(self, model: Callable, guide: Callable, settings: TrainSettings, num_examples: int, *, sites: ModelSites | None = None,
                 gamma: float = 40.0, discriminator_lr: float = 1e-4, hidden: int = 1000, layers: int = 6, clip_norm: float | None = None) -> None:
        super().__init__(model, guide, settings, num_examples, sites=sites, clip_norm=clip_norm)
        for option, value, low in (("gamma", gamma, 0.0), ("discriminator_lr", discriminator_lr, None)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (value < 0 if low == 0.0 else value <= 0):
                raise PyrovaeError(f"factor-vae option {option} must be a {'number >= 0' if low == 0.0 else 'positive number'}, got {value!r}")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1 or isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise PyrovaeError(f"factor-vae options hidden and layers must be positive whole numbers, got {hidden!r} and {layers!r}")
        if settings.particles != 1:
            raise PyrovaeError(f"factor-vae scores one draw per example (its discriminator reads the minibatch's codes), got --particles {settings.particles}")
        self.gamma, self.discriminator_lr, self.hidden, self.layers = float(gamma), float(discriminator_lr), hidden, layers
        self.captured = None  # every step also trains the discriminator on the step's own draw
        self.discriminator: nn.Sequential | None = None
        self.discriminator_optimizer: torch.optim.Adam | None = None
        if self.sites is not None:
            self._build(self.sites)

    def _build(self, sites: ModelSites) -> None:
        if sites.global_latents or sites.discrete or sites.enumerated:
            raise PyrovaeError("factor-vae needs per-example, continuous latents only: its discriminator reads each example's code")
        dim = sum(math.prod(shape) for shape in sites.latents.values())
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        self.discriminator = discriminator(dim, self.hidden, self.layers).to(device)
        self.discriminator_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=self.discriminator_lr, betas=(0.5, 0.9))

    def prepare(self, data: Data) -> None:
        super().prepare(data)
        if self.discriminator is None:
            assert self.sites is not None
            self._build(self.sites)

    def parameters(self) -> list[torch.Tensor]:
        """Model, guide and discriminator parameters (the loss reaches all three)."""
        extra = list(self.discriminator.parameters()) if self.discriminator is not None else []
        return [*super().parameters(), *extra]

    def codes(self, guide_trace: Any, batch: int) -> torch.Tensor:
        """The guide's draw of every latent site, ``(B, D)``."""
        assert self.sites is not None
        try:
            return torch.cat([guide_trace.nodes[name]["value"].reshape(batch, -1) for name in self.sites.latents], dim=-1)
        except (KeyError, RuntimeError) as error:
            raise PyrovaeError(f"factor-vae could not read one code per example from the guide's draw: {error}") from None

    def step(self, x: Data, index: torch.Tensor, beta: float = 1.0, weights: torch.Tensor | None = None) -> torch.Tensor:
        """One Adam step of model and guide on -ELBO + gamma TC (nats per example), then one of the discriminator."""
        if weights is not None:
            raise PyrovaeError("factor-vae trains on uniform minibatches: drop --labelled-per-batch")
        first = not self.prepared
        self.prepare(x)
        assert self.discriminator is not None and self.discriminator_optimizer is not None
        recorder = poutine.trace(self.guide)
        self.optimizer.zero_grad(set_to_none=True)
        with self.fast_path():
            bound = self.loss(x, index, beta, guide=recorder)
        codes = self.codes(recorder.msngr.trace, len(as_batch(x)))
        logits = self.discriminator(codes)
        loss = bound + self.gamma * (logits[:, 0] - logits[:, 1]).mean()
        if first:
            self.check_complete(loss)
        loss.backward()
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for group in self.optimizer.param_groups for p in group["params"]], self.clip_norm)
        self.optimizer.step()
        self.discriminator_step(codes.detach())
        return loss.detach()

    def discriminator_step(self, codes: torch.Tensor) -> None:
        """One Adam step of the discriminator: joint codes are class 0, shuffled ones class 1."""
        assert self.discriminator is not None and self.discriminator_optimizer is not None
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        joint, product = self.discriminator(codes), self.discriminator(permute_dims(codes))
        zeros = torch.zeros(len(codes), dtype=torch.long, device=codes.device)
        (0.5 * (F.cross_entropy(joint, zeros) + F.cross_entropy(product, zeros + 1))).backward()
        self.discriminator_optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        """With the discriminator and its optimizer once built (at construction where the guide
        names the model's sites, else by `prepare`)."""
        state = super().state_dict()
        if self.discriminator is None or self.discriminator_optimizer is None:
            return state
        return {**state, "discriminator": self.discriminator.state_dict(), "discriminator_optimizer": self.discriminator_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if ("discriminator" in state) != (self.discriminator is not None):
            raise RuntimeError("this state and this method differ in having a discriminator: call prepare(data) before load_state_dict")
        super().load_state_dict(state)
        if self.discriminator is not None and self.discriminator_optimizer is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
