"""AIR, Attend-Infer-Repeat (Eslami et al. 2016; Kingma & Welling 2019, sec. 1.1: models with attention).

A scene is a variable number of objects, at most `steps`. Object t exists with z_pres_t ~
Bernoulli (and only if object t - 1 does), sits where its z_where_t = (s, x, y) puts it, and
looks like its z_what_t: a decoder draws z_what_t as a `window` x `window` patch, and a spatial
transformer (`window_to_image`) scales it by 1 / s and shifts it to (-x / s, -y / s) in the
image's [-1, 1] coordinates. The objects' patches compose the image: by noisy-OR under the
Bernoulli likelihood (binary digits overlap as a pixelwise OR), by their sum under the Gaussian
one (Eslami et al.; Pyro's AIR example, with sd 0.3).

z_pres is discrete and not reparameterizable: train with ``--objective elbo-graph`` (Pyro's
TraceGraph_ELBO), whose score-function terms for z_pres use the baseline the guide
(`pyrovae.guides.air`) attaches to each z_pres site. z_where and z_what of an absent object
are masked out of every bound, in the model and the guide alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pyrovae.errors import PyrovaeError
from pyrovae.nets import MLP
from pyrovae.registry import MODELS
from pyrovae.sites import data_plate, register

__all__ = ["AIR", "continuation_probabilities", "image_to_window", "window_to_image", "z_where_box"]

WHERE = 3  # z_where = (scale, x shift, y shift)


def continuation_probabilities(ratio: float, steps: int) -> torch.Tensor:
    """P(object t exists | object t - 1 does), t = 1 .. steps, for the truncated geometric prior
    p(n objects) proportional to ratio^n on n = 0 .. steps: each object costs log(1 / ratio) nats."""
    tail = torch.tensor([ratio**n for n in range(steps + 1)], dtype=torch.float64).flip(0).cumsum(0).flip(0)  # sum_{j >= n} ratio^j
    return (tail[1:] / tail[:-1]).float()


MIN_SCALE = 1e-2  # |s| below this zooms into less than a pixel: taken as this, so glimpses stay finite


def _scale(z_where: torch.Tensor) -> torch.Tensor:
    """s of each z_where, (..., 1), at least `MIN_SCALE` in magnitude (the model's and the guide's
    transformer alike, so the density is still of a deterministic function of z_where)."""
    s = z_where[..., :1]
    return torch.where(s.abs() < MIN_SCALE, torch.full_like(s, MIN_SCALE), s)


def _theta(z_where: torch.Tensor) -> torch.Tensor:
    """The affine map [[s, 0, x], [0, s, y]] of each z_where, (N, 2, 3)."""
    s, x, y = torch.cat([_scale(z_where), z_where[..., 1:]], -1).unbind(-1)
    zero = torch.zeros_like(s)
    return torch.stack([s, zero, x, zero, s, y], -1).reshape(-1, 2, 3)


def _inverse(z_where: torch.Tensor) -> torch.Tensor:
    """The z_where of the inverse map: (1 / s, -x / s, -y / s)."""
    s = _scale(z_where)
    return torch.cat([torch.ones_like(s), -z_where[..., 1:]], -1) / s


def window_to_image(z_where: torch.Tensor, windows: torch.Tensor, side: int) -> torch.Tensor:
    """Each (..., window^2) patch placed on a blank (..., side^2) image by its z_where: image point
    u shows the patch at s u + (x, y) (a spatial transformer, Jaderberg et al. 2015)."""
    lead, window = tuple(windows.shape[:-1]), math.isqrt(windows.shape[-1])
    grid = F.affine_grid(_theta(z_where.expand(*lead, WHERE)), [math.prod(lead), 1, side, side], align_corners=False)
    out = F.grid_sample(windows.reshape(-1, 1, window, window), grid, align_corners=False)
    return out.reshape(*lead, side * side)


def image_to_window(z_where: torch.Tensor, images: torch.Tensor, window: int) -> torch.Tensor:
    """The (..., window^2) glimpse of each (..., side^2) image that `window_to_image` with the same
    z_where would have drawn: the inverse transformer."""
    lead = torch.broadcast_shapes(z_where.shape[:-1], images.shape[:-1])
    side = math.isqrt(images.shape[-1])
    grid = F.affine_grid(_theta(_inverse(z_where).expand(*lead, WHERE)), [math.prod(lead), 1, window, window], align_corners=False)
    out = F.grid_sample(images.expand(*lead, side * side).reshape(-1, 1, side, side), grid, align_corners=False)
    return out.reshape(*lead, window * window)


def z_where_box(z_where: torch.Tensor, side: int) -> torch.Tensor:
    """The pixel box (x0, y0, width, height) a window covers on a (side x side) image, (..., 4)."""
    s, x, y = torch.cat([_scale(z_where), z_where[..., 1:]], -1).unbind(-1)
    width = side / s  # the window's [-1, 1] is the image's (-1 - x) / s .. (1 - x) / s
    return torch.stack([(1 - x / s) * side / 2 - width / 2, (1 - y / s) * side / 2 - width / 2, width, width], -1)


@MODELS.register("air", "AIR: up to T objects, each z_pres (Bernoulli), z_where (spatial transformer), z_what (Eslami et al. 2016)")
class AIR(nn.Module):
    """p(x, z) = prod_t p(z_pres_t | z_pres_{t-1}) [p(z_where_t) p(z_what_t)]^{z_pres_t} p(x | scene).

    Args:
        data_shape: square images, flattened (side * side,).
        latent: size of each z_what.
        steps: the most objects in a scene.
        window: the side of an object's patch.
        hidden: the patch decoder's hidden layers.
        presence: the prior's ratio p(n + 1 objects) / p(n objects) (`continuation_probabilities`).
        scale, position: (mean, sd) of the Gaussian priors on z_where's s and on its x and y.
        likelihood: ``bernoulli`` (binary images; patches combined by noisy-OR) or ``gaussian``
            (sd `noise`; patches summed).
        decoder_bias: added to the patch decoder's logits, so that a new object starts faint.

    References:
        Eslami et al. (2016), Attend, Infer, Repeat: Fast Scene Understanding with Generative
        Models, sec. 2 and 3.1 (multi-MNIST); Pyro's ``examples/air`` (its truncated geometric
        count prior, the sigmoid decoder with bias -2, the z_where priors).
    """

    def __init__(self, data_shape: Sequence[int], latent: int = 50, steps: int = 3, window: int = 28, hidden: Sequence[int] = (200,),
                 presence: float = 0.01, scale: Sequence[float] = (3.0, 0.2), position: Sequence[float] = (0.0, 1.0),
                 likelihood: str = "bernoulli", noise: float = 0.3, decoder_bias: float = -2.0, activation: str = "relu") -> None:
        super().__init__()
        side = math.isqrt(data_shape[0]) if len(data_shape) == 1 else 0
        if len(data_shape) != 1 or side * side != data_shape[0]:
            raise PyrovaeError(f"air models square images, flattened; got data of shape {tuple(data_shape)}")
        if min(latent, steps, window) < 1 or not 0 < presence <= 1 or noise <= 0 or len(scale) != 2 or len(position) != 2 or min(scale[1], position[1]) <= 0:
            raise PyrovaeError("air needs positive latent, steps, window and noise, presence in (0, 1], and (mean, sd > 0) pairs for scale and position")
        if likelihood not in ("bernoulli", "gaussian"):
            raise PyrovaeError(f"air's likelihood is bernoulli or gaussian, not {likelihood!r}")
        self.side, self.dim, self.latent, self.steps, self.window = side, data_shape[0], latent, steps, window
        self.likelihood, self.noise = likelihood, noise
        if likelihood == "gaussian":
            self.scores = "log p(x), a density (Gaussian pixels)"
        self.decoder = MLP(latent, tuple(hidden), window * window, activation)
        self.decoder_bias = decoder_bias
        self.register_buffer("continue_p", continuation_probabilities(presence, steps))
        self.register_buffer("where_loc", torch.tensor([scale[0], position[0], position[0]]))
        self.register_buffer("where_scale", torch.tensor([scale[1], position[1], position[1]]))

    def check_data(self, x: torch.Tensor) -> None:
        if self.likelihood == "bernoulli" and not ((x == 0) | (x == 1)).all():
            raise PyrovaeError("air's bernoulli likelihood needs 0/1 data: binarize it, or use --likelihood gaussian")

    def patches(self, z_what: torch.Tensor) -> torch.Tensor:
        """An object's patch in [0, 1], (..., window^2)."""
        return torch.sigmoid(self.decoder(z_what) + self.decoder_bias)

    def image(self, objects: list[torch.Tensor]) -> dist.Distribution:
        """p(x | scene) for the objects' drawn images (each already multiplied by its z_pres)."""
        if self.likelihood == "gaussian":
            return dist.Normal(sum(objects), self.noise).to_event(1)
        # log prod_t (1 - y_t); a saturated sigmoid's y_t = 1.0 would give it an infinite gradient
        blank = torch.stack(torch.broadcast_tensors(*objects)).clamp(max=1 - 1e-6).neg().log1p().sum(0)
        eps = 1e-4
        return dist.Bernoulli(probs=eps + (1 - 2 * eps) * -torch.expm1(blank), validate_args=False).to_event(1)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> None:
        register("air", self)
        n = len(x)
        with data_plate(x, index, size):
            present = x.new_ones(n)
            objects = [x.new_zeros(n, self.dim)]
            for t in range(self.steps):
                present = pyro.sample(f"z_pres_{t + 1}", dist.Bernoulli(self.continue_p[t] * present))
                there = present.bool()
                z_where = pyro.sample(f"z_where_{t + 1}", dist.Normal(self.where_loc, self.where_scale).expand([n, WHERE]).to_event(1).mask(there))
                z_what = pyro.sample(f"z_what_{t + 1}", dist.Normal(x.new_zeros(n, self.latent), 1.0).to_event(1).mask(there))
                objects.append(present[..., None] * window_to_image(z_where, self.patches(z_what), self.side))
            pyro.sample("x", self.image(objects), obs=x)
