"""Normalizing-flow posteriors q(z|x) with amortized, per-example flow parameters (sec. 3).

z0 ~ N(mu(x), diag sigma(x)^2), then z = f_K o ... o f_1(z0), each f_k a *conditional*
transform conditioned on a context computed from x (the encoder's features, or a context
vector h emitted by the head as in IAF). The density of a sample is the change of variables
log q(z|x) = log N(z0) - sum_k log|det df_k/dz_{k-1}| (Kingma & Welling 2019, sec. 3.3).

`FlowGuide` holds the shared plumbing (base Gaussian, conditioning, the distribution); each
flow only says which conditional transforms it stacks. Planar, radial and Sylvester flows
have no analytic inverse: the density of a guide's own sample is computed from the
transforms' cache (`cache_size=1`), which is exactly what Pyro's traces and
`pyrovae.evaluate` do (they score the value the guide just drew).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.transforms import (
    ConditionalPlanar,
    ConditionalRadial,
    ConditionalSplineAutoregressive,
    Permute,
)
from pyro.nn import ConditionalAutoRegressiveNN, DenseNN
from torch import nn
from torch.distributions.transforms import Transform
from torch.nn.functional import softplus

from pyrovae.errors import PyrovaeError
from pyrovae.guides.base import AmortizedGuide, _key
from pyrovae.registry import GUIDES
from pyrovae.sites import ModelSites

__all__ = [
    "FlowGuide",
    "PlanarFlow",
    "RadialFlow",
    "SylvesterFlow",
    "SplineFlow",
    "ConditionalSylvester",
    "ConditionedSylvester",
    "Reverse",
]


class Reverse(ConditionalTransformModule):
    """Reverses the order of the latent dimensions (between autoregressive steps); no parameters."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("permutation", torch.arange(dim - 1, -1, -1), persistent=False)

    def condition(self, context: torch.Tensor) -> Transform:
        return Permute(self.permutation)  # cache_size=1: a sample's inverse is its cached input


class FlowGuide(AmortizedGuide):
    """Shared plumbing of the flow guides: a base Gaussian and conditional transforms per site.

    The head of each latent site emits (mu, raw sigma[, h]); `context_size` None conditions
    the transforms on the encoder's features, an integer on an h of that size from the head.
    Subclasses implement `make_flow(dim, context_dim)`, the list of conditional transforms.

    References:
        Kingma & Welling (2019), sec. 3.3 (normalizing flows for q(z|x)).
    """

    latent_shapes: ClassVar[str] = "vectors (event dim 1)"
    vector_latents_only: ClassVar[bool] = True
    min_scale = 1e-4

    def __init__(
        self,
        sites: ModelSites,
        data_shape: Sequence[int],
        hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
        flow_steps: int = 4,
        flow_hidden: Sequence[int] | None = None,
        context_size: int | None = None,
    ) -> None:
        if flow_steps < 0:
            raise PyrovaeError(f"flow_steps must be non-negative, got {flow_steps}")
        if context_size is not None and context_size < 1:
            raise PyrovaeError(f"context_size must be positive, got {context_size}")
        # make_head runs inside AmortizedGuide.__init__ and reads these
        self.flow_steps = flow_steps
        self.flow_hidden = None if flow_hidden is None else [int(h) for h in flow_hidden]
        self.context_size = context_size
        super().__init__(sites, data_shape, hidden, activation)


    def hidden_for(self, dim: int) -> list[int]:
        """Hidden sizes of the flow's own networks: `flow_hidden`, else Pyro's default [10 d, 10 d]."""
        hidden = list(self.flow_hidden) if self.flow_hidden is not None else [10 * dim, 10 * dim]
        if not hidden or min(hidden) < 1:
            raise PyrovaeError(f"flow_hidden must be one or more positive sizes, got {hidden}")
        return hidden

    def autoregressive_hidden(self, dim: int) -> list[int]:
        """Hidden sizes of a MADE over d inputs: each must be at least d to keep every connection."""
        hidden = self.hidden_for(dim)
        if min(hidden) < dim:
            raise PyrovaeError(f"flow_hidden {hidden} of an autoregressive flow must be at least the latent size {dim}")
        return hidden

    def make_head(self, name: str, shape: torch.Size) -> nn.Module:
        (dim,) = shape
        context_dim = self.features if self.context_size is None else self.context_size
        encoder = nn.Linear(self.features, 2 * dim + (self.context_size or 0))
        return _FlowHead(encoder, self.make_flow(dim, context_dim))

    def make_flow(self, dim: int, context_dim: int) -> list[ConditionalTransformModule]:
        raise NotImplementedError

    def flow(self, name: str, features: torch.Tensor) -> tuple[dist.Distribution, list[Transform]]:
        """The base q(z0|x) and the transforms conditioned on each example's context."""
        head = self.heads[_key(name)]
        (dim,) = self.sites.real_shape(name)
        out = head.encoder(features)
        loc, raw_scale, h = out.split([dim, dim, out.shape[-1] - 2 * dim], dim=-1)
        context = features if self.context_size is None else h
        base = dist.Normal(loc, softplus(raw_scale) + self.min_scale).to_event(1)
        return base, [step.condition(context) for step in head.steps]

    def distribution(self, name: str, features: torch.Tensor) -> dist.Distribution:
        base, transforms = self.flow(name, features)
        return dist.TransformedDistribution(base, transforms)


class _FlowHead(nn.Module):
    def __init__(self, encoder: nn.Module, steps: list[nn.Module]) -> None:
        super().__init__()
        self.encoder = encoder
        self.steps = nn.ModuleList(steps)


@GUIDES.register("planar", "planar flow with amortized per-example parameters (Rezende & Mohamed 2015)")
class PlanarFlow(FlowGuide):
    """K planar steps f(z) = z + u h(w^T z + b), (u, w, b) from a hypernet on the encoder features.

    Pyro's `ConditionalPlanar` enforces w^T u >= -1 (invertibility) and supplies the
    log-determinant log|1 + u^T h'(w^T z + b) w|.

    Options: flow_steps (4), flow_hidden (hypernet hidden sizes, default [10 d, 10 d]).

    References:
        Rezende & Mohamed (2015), Variational Inference with Normalizing Flows, sec. 4.1;
        Kingma & Welling (2019), sec. 3.3.
    """

    def __init__(self, sites, data_shape, hidden=(200, 200), activation="tanh", flow_steps: int = 4, flow_hidden=None) -> None:
        super().__init__(sites, data_shape, hidden, activation, flow_steps, flow_hidden)

    def make_flow(self, dim, context_dim):
        return [ConditionalPlanar(DenseNN(context_dim, self.hidden_for(dim), [1, dim, dim])) for _ in range(self.flow_steps)]


@GUIDES.register("radial", "radial flow with amortized per-example parameters (Rezende & Mohamed 2015)")
class RadialFlow(FlowGuide):
    """K radial steps f(z) = z + beta h(alpha, r)(z - z_ref), parameters from a hypernet on the features.

    Options: flow_steps (4), flow_hidden (hypernet hidden sizes, default [10 d, 10 d]).

    References:
        Rezende & Mohamed (2015), Variational Inference with Normalizing Flows, sec. 4.1;
        Kingma & Welling (2019), sec. 3.3.
    """

    def __init__(self, sites, data_shape, hidden=(200, 200), activation="tanh", flow_steps: int = 4, flow_hidden=None) -> None:
        super().__init__(sites, data_shape, hidden, activation, flow_steps, flow_hidden)

    def make_flow(self, dim, context_dim):
        return [ConditionalRadial(DenseNN(context_dim, self.hidden_for(dim), [dim, 1, 1])) for _ in range(self.flow_steps)]


@GUIDES.register("spline", "conditional rational-quadratic/linear neural spline flow, autoregressive (Durkan et al. 2019)")
class SplineFlow(FlowGuide):
    """Autoregressive monotone spline steps conditioned on the encoder features, reversed between steps.

    Each step is Pyro's `ConditionalSplineAutoregressive` (a MADE over z and the context
    emits the bins of a monotone spline on [-bound, bound] per dimension; identity outside).

    Options: flow_steps (2), flow_hidden (MADE hidden sizes, default [10 d, 10 d]),
    count_bins (8), bound (3.0), order ("linear": rational-linear; or "quadratic").

    References:
        Durkan et al. (2019), Neural Spline Flows, sec. 3; Dolatabadi et al. (2020),
        Invertible Generative Modeling using Linear Rational Splines;
        Kingma & Welling (2019), sec. 3.3-3.4.
    """

    def __init__(
        self,
        sites,
        data_shape,
        hidden=(200, 200),
        activation="tanh",
        flow_steps: int = 2,
        flow_hidden=None,
        count_bins: int = 8,
        bound: float = 3.0,
        order: str = "linear",
    ) -> None:
        if order not in ("linear", "quadratic"):
            raise PyrovaeError(f"spline order must be 'linear' or 'quadratic', got {order!r}")
        self.count_bins, self.bound, self.order = count_bins, bound, order
        super().__init__(sites, data_shape, hidden, activation, flow_steps, flow_hidden)

    def make_flow(self, dim, context_dim):
        bins = self.count_bins
        param_dims = [bins, bins, bins - 1] + ([bins] if self.order == "linear" else [])
        steps: list[ConditionalTransformModule] = []
        for k in range(self.flow_steps):
            if k:
                steps.append(Reverse(dim))
            arn = ConditionalAutoRegressiveNN(
                dim, context_dim, self.autoregressive_hidden(dim), param_dims=param_dims, permutation=torch.arange(dim)
            )
            steps.append(ConditionalSplineAutoregressive(dim, arn, count_bins=bins, bound=self.bound, order=self.order))
        return steps


# --- Sylvester flows -------------------------------------------------------------------------
#
# Pyro's own `pyro.distributions.transforms.Sylvester` does not fit here: it is a
# TransformModule whose R1, R2, Householder vectors and b are global nn.Parameters shared by
# every example (not conditional, so not amortized), and it only has the Householder variant.
# Van den Berg et al. emit the flow parameters per example from the encoder; below they come
# from a hypernet on the encoder features, for the orthogonal, Householder and triangular Q.

SYLVESTER_VARIANTS = ("orthogonal", "householder", "triangular")


class ConditionedSylvester(Transform):
    """z' = z + Q R1 h(R2 Q^T z + b), h = tanh, with per-example Q, R1, R2, b (batched).

    R1, R2 are M x M upper triangular with diagonals tanh(.) in (-1, 1), so that
    1 + r1_ii r2_ii h'(.) > 0 and the map is invertible; Q (D x M) has orthonormal columns.
    By Sylvester's determinant identity, log|det J| = sum_i log|1 + r1_ii r2_ii h'((R2 Q^T z + b)_i)|.
    No analytic inverse: a sample's density uses the cached input (cache_size=1).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, q: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__(cache_size=1)
        self.q, self.r1, self.r2, self.b = q, r1, r2, b  # (..., D, M), (..., M, M), (..., M, M), (..., M)

    def _preactivation(self, x: torch.Tensor) -> torch.Tensor:
        qtz = torch.matmul(x.unsqueeze(-2), self.q).squeeze(-2)  # (..., M)
        return torch.matmul(self.r2, qtz.unsqueeze(-1)).squeeze(-1) + self.b

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self._preactivation(x))
        r1h = torch.matmul(self.r1, h.unsqueeze(-1))  # (..., M, 1)
        return x + torch.matmul(self.q, r1h).squeeze(-1)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a Sylvester flow has no analytic inverse: only its own samples can be scored")

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        derivative = 1 - torch.tanh(self._preactivation(x)).pow(2)
        diagonal = self.r1.diagonal(dim1=-2, dim2=-1) * self.r2.diagonal(dim1=-2, dim2=-1)
        return torch.log1p(diagonal * derivative).sum(-1)  # diagonal * derivative > -1


class ConditionalSylvester(ConditionalTransformModule):
    """A Sylvester step whose (Q, R1, R2, b) a hypernet emits from the context, per example.

    Args:
        dim: D, the latent size.
        context_dim: size of the context.
        hidden: hypernet hidden sizes.
        variant: "orthogonal" (Q = first M columns of the Cayley transform of A, skew-symmetric from the hypernet),
            "householder" (Q = H_1 ... H_H, reflections from the hypernet, M = D) or
            "triangular" (Q = I on even steps and the reversal permutation on odd ones, M = D).
        step: the index of this step (the triangular variant alternates Q).
        columns: M for the orthogonal variant (default D).
        reflections: H for the Householder variant (default D).
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        hidden: Sequence[int],
        variant: str = "orthogonal",
        step: int = 0,
        columns: int | None = None,
        reflections: int | None = None,
    ) -> None:
        super().__init__()
        if variant not in SYLVESTER_VARIANTS:
            raise PyrovaeError(f"unknown Sylvester variant {variant!r}: choose from {', '.join(SYLVESTER_VARIANTS)}")
        self.dim, self.variant = dim, variant
        self.m = columns if (variant == "orthogonal" and columns) else dim
        if not 1 <= self.m <= dim:
            raise PyrovaeError(f"Sylvester columns must be between 1 and the latent size {dim}, got {self.m}")
        self.reflections = reflections or dim
        m = self.m
        if variant == "orthogonal":
            q_params = dim * (dim - 1) // 2
        elif variant == "householder":
            q_params = self.reflections * dim
        else:
            q_params = 0
            fixed = torch.eye(dim) if step % 2 == 0 else torch.eye(dim).flip(-1)
            self.register_buffer("fixed_q", fixed, persistent=False)
        strict = m * (m - 1) // 2
        self.param_dims = [strict, strict, m, m, m, q_params]
        self.hypernet = DenseNN(context_dim, list(hidden), [p for p in self.param_dims if p])
        self.register_buffer("upper", torch.triu_indices(m, m, offset=1), persistent=False)
        self.register_buffer("skew", torch.triu_indices(dim, dim, offset=1), persistent=False)

    def condition(self, context: torch.Tensor) -> ConditionedSylvester:
        out = self.hypernet(context)
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        params = [out.pop(0) if p else None for p in self.param_dims]
        strict1, strict2, diag1, diag2, b, q_raw = params
        batch = context.shape[:-1]
        r1 = self._triangular(strict1, torch.tanh(diag1), batch)
        r2 = self._triangular(strict2, torch.tanh(diag2), batch)
        return ConditionedSylvester(self._q(q_raw, batch, context), r1, r2, b)

    def _triangular(self, strict: torch.Tensor | None, diagonal: torch.Tensor, batch: torch.Size) -> torch.Tensor:
        r = torch.diag_embed(diagonal)
        if strict is not None:
            r = _scatter_upper(r, strict, self.upper)
        return r

    def _q(self, raw: torch.Tensor | None, batch: torch.Size, like: torch.Tensor) -> torch.Tensor:
        d = self.dim
        if self.variant == "triangular":
            return self.fixed_q.to(like.dtype).expand(batch + (d, d))
        if self.variant == "householder":
            v = raw.reshape(batch + (self.reflections, d))
            q = torch.eye(d, dtype=like.dtype, device=like.device).expand(batch + (d, d))
            for k in range(self.reflections):
                vk = v[..., k, :]
                vk = vk / vk.norm(dim=-1, keepdim=True).clamp_min(1e-8)
                # Q <- Q (I - 2 v v^T)
                q = q - 2 * torch.matmul(q, vk.unsqueeze(-1)) * vk.unsqueeze(-2)
            return q
        # orthogonal: the Cayley transform (I + A)^-1 (I - A) of a skew-symmetric A is exactly
        # orthogonal (I + A is always invertible) and differentiable; van den Berg et al.
        # orthogonalize iteratively instead, and torch's matrix_exp costs 20x more per example
        a = torch.zeros(batch + (d, d), dtype=like.dtype, device=like.device)
        if raw is not None:
            a = _scatter_upper(a, raw, self.skew)
            a = a - a.transpose(-1, -2)
        eye = torch.eye(d, dtype=like.dtype, device=like.device)
        return torch.linalg.solve(eye + a, eye - a)[..., : self.m]


def _scatter_upper(r: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """r with `values` (..., n) added at the upper-triangular positions `index` (2, n)."""
    n = r.shape[-1]
    flat = torch.zeros(values.shape[:-1] + (n * n,), dtype=values.dtype, device=values.device)
    flat = flat.index_copy(-1, index[0] * n + index[1], values)
    return r + flat.reshape(values.shape[:-1] + (n, n))


@GUIDES.register("sylvester", "Sylvester flow, amortized; orthogonal / Householder / triangular Q (van den Berg et al. 2018)")
class SylvesterFlow(FlowGuide):
    """K Sylvester steps z' = z + Q R1 h(R2 Q^T z + b) with per-example parameters from the features.

    A rank-M generalization of the planar flow whose Jacobian determinant is still cheap
    (a product over the diagonals of R1 and R2).

    Options: flow_steps (4), flow_hidden (hypernet hidden sizes, default [10 d, 10 d]),
    variant ("orthogonal"; or "householder", "triangular"), columns (M of the orthogonal
    variant, default d), reflections (Householder reflections per step, default d).

    References:
        van den Berg, Hasenclever, Tomczak & Welling (2018), Sylvester Normalizing Flows for
        Variational Inference, sec. 3 (3.1 orthogonal, 3.2 Householder, 3.3 triangular);
        Kingma & Welling (2019), sec. 3.3.
    """

    def __init__(
        self,
        sites,
        data_shape,
        hidden=(200, 200),
        activation="tanh",
        flow_steps: int = 4,
        flow_hidden=None,
        variant: str = "orthogonal",
        columns: int | None = None,
        reflections: int | None = None,
    ) -> None:
        if variant not in SYLVESTER_VARIANTS:
            raise PyrovaeError(f"unknown Sylvester variant {variant!r}: choose from {', '.join(SYLVESTER_VARIANTS)}")
        self.variant, self.columns, self.reflections = variant, columns, reflections
        super().__init__(sites, data_shape, hidden, activation, flow_steps, flow_hidden)

    def make_flow(self, dim, context_dim):
        return [
            ConditionalSylvester(dim, context_dim, self.hidden_for(dim), self.variant, k, self.columns, self.reflections)
            for k in range(self.flow_steps)
        ]
