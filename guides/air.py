"""AIR's recurrent inference network (Eslami et al. 2016, sec. 2.1): an LSTM that attends to one
object per step, with a learned baseline for the score-function gradient of z_pres."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.nn.functional import softplus

from pyrovae.models.air import AIR, WHERE, image_to_window, z_where_box
from pyrovae.models.draw import lstm_step
from pyrovae.nets import MLP, broadcast_cat
from pyrovae.registry import GUIDES
from pyrovae.sites import ModelSites, data_plate, register

__all__ = ["AIRGuide"]


@GUIDES.register("air", "AIR's recurrent guide: an LSTM proposing z_pres, z_where, then z_what from the attended glimpse, with an NVIL baseline (Eslami et al. 2016)")
class AIRGuide(nn.Module):
    """q(z | x) = prod_t q(z_pres_t | x, z_<t) [q(z_where_t | x, z_<t) q(z_what_t | glimpse_t)]^{z_pres_t}.

    An LSTM reads [x, z_where_{t-1}, z_what_{t-1}, z_pres_{t-1}]; from its state a network gives
    the presence probability and the Gaussian z_where (its loc relative to the prior's mean, its
    scale a multiple of the prior's); the glimpse `image_to_window(z_where_t, x)` gives z_what_t.

    Each z_pres site carries ``infer={"baseline": {"baseline_value": b_t}}``: b_t, from a second
    LSTM on the same inputs (detached), predicts the downstream cost of the site, and
    TraceGraph_ELBO (``--objective elbo-graph``) subtracts it inside the score-function term
    and regresses it on the cost (Mnih & Gregor 2014, NVIL). The baseline predicts nats per
    example, scaled to the minibatch's share of the data set, and learns at its own rate
    (`baseline_lr`, 0.1 as in Pyro's AIR example; ``--method-option baseline_lr=...``).

    Args:
        state: the LSTMs' size.
        hidden: the hidden layers of the z_what encoder, the z_pres/z_where predictor and the
            baseline's predictor.
        baseline: False trains z_pres with the plain score function (the variance test's control).

    References:
        Eslami et al. (2016), sec. 2.1-2.2 and appendix; Mnih & Gregor (2014), Neural
        Variational Inference and Learning in Belief Networks; Pyro's ``examples/air``.
    """

    latent_shapes: ClassVar[str] = "AIR's z_pres, z_where, z_what per step"
    gives_elbo: ClassVar[bool] = True
    baseline_lr: ClassVar[float] = 0.1

    def __init__(self, sites: ModelSites, data_shape: Sequence[int], model: Any, state: int = 256, hidden: Sequence[int] = (200,),
                 activation: str = "relu", baseline: bool = True) -> None:
        super().__init__()
        self.model = [model]  # the model's sizes and priors, not its parameters
        inputs = model.dim + WHERE + model.latent + 1
        self.rnn = nn.LSTMCell(inputs, state)
        self.predict = MLP(state, tuple(hidden), 1 + 2 * WHERE, activation)
        self.encode = MLP(model.window * model.window, tuple(hidden), 2 * model.latent, activation)
        self.initial = nn.ParameterDict({"h": nn.Parameter(torch.zeros(state)), "c": nn.Parameter(torch.zeros(state)),
                                         "where": nn.Parameter(torch.zeros(WHERE)), "what": nn.Parameter(torch.zeros(model.latent))})
        self.baseline = nn.ModuleDict({"rnn": nn.LSTMCell(inputs, state), "predict": MLP(state, tuple(hidden), 1, activation)}) if baseline else None

    @classmethod
    def supports(cls, model: Callable, sites: ModelSites) -> str | None:
        return None if isinstance(model, AIR) else "it is the guide of AIR: --model air"

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None, size: int | None = None) -> list[torch.Tensor]:
        """Samples the scene; returns each step's z_where, for `boxes`."""
        register("air_guide", self)
        (model,) = self.model
        n, share = len(x), (size or len(x)) / len(x)  # a minibatch's log-densities are scaled by N / B
        h, c = self.initial["h"].expand(n, -1), self.initial["c"].expand(n, -1)
        baseline_h, baseline_c = h, c
        present, where, what = x.new_ones(n), self.initial["where"].expand(n, -1), self.initial["what"].expand(n, -1)
        wheres = []
        with data_plate(x, index, size):
            for t in range(model.steps):
                inputs = broadcast_cat(x, where, what, present[..., None])
                h, c = lstm_step(self.rnn, inputs, h, c)
                out = self.predict(h)
                p, loc, scale = torch.sigmoid(out[..., 0]), out[..., 1 : 1 + WHERE], softplus(out[..., 1 + WHERE :])
                infer = {}
                if self.baseline is not None:
                    baseline_h, baseline_c = lstm_step(self.baseline["rnn"], inputs.detach(), baseline_h, baseline_c)
                    value = share * self.baseline["predict"](baseline_h)[..., 0] * present.detach()
                    infer = {"baseline": {"baseline_value": value}}
                present = pyro.sample(f"z_pres_{t + 1}", dist.Bernoulli(p * present), infer=infer)
                there = present.bool()
                where = pyro.sample(f"z_where_{t + 1}", dist.Normal(model.where_loc + loc, model.where_scale * scale).to_event(1).mask(there))
                what_loc, what_scale = self.encode(image_to_window(where, x, model.window)).chunk(2, -1)
                what = pyro.sample(f"z_what_{t + 1}", dist.Normal(what_loc, softplus(what_scale)).to_event(1).mask(there))
                wheres.append(where)
        return wheres

    @torch.no_grad()
    def scenes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One draw of each image's scene: the object count (B,) and the boxes (B, steps, 4) in
        pixels (x0, y0, width, height), NaN where an object is absent."""
        trace = poutine.trace(self).get_trace(x)
        (model,) = self.model
        present = torch.stack([trace.nodes[f"z_pres_{t + 1}"]["value"] for t in range(model.steps)], -1)
        boxes = z_where_box(torch.stack(trace.nodes["_RETURN"]["value"], -2), model.side)
        return present.sum(-1).long(), torch.where(present.bool()[..., None], boxes, torch.nan)
