"""A trained run's representation scored by the disentanglement metrics (`pyrovae.disentanglement`).

The representation of an observation is its encoding: the guide's posterior mean of every
latent site, flattened into one code (`pyrovae.sampling.encode`), as Locatello et al. score
the mean of q(z|x). The observations are drawn from the run's data set's ground truth.

References:
    Locatello et al. (2019), Challenging Common Assumptions in the Unsupervised Learning of
    Disentangled Representations, ICML, sec. 3 and appendix C (the metrics and their settings).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pyrovae.disentanglement import METRICS, SETTINGS, Representation, score
from pyrovae.errors import PyrovaeError
from pyrovae.experiment import Experiment
from pyrovae.sampling import encode

__all__ = ["METRICS", "encoder", "score_run"]

CHUNK = 1000  # observations encoded at once


def encoder(experiment: Experiment) -> Representation:
    """The run's representation: observations ``(n, ...)`` -> posterior means ``(n, D)``."""
    sites = experiment.method.sites
    if experiment.amortized_guide is None or sites is None:
        raise PyrovaeError(f"the disentanglement metrics score an encoder; this run ({experiment.config.method}) trained none")
    if experiment.config.fields != "x":
        raise PyrovaeError(f"the disentanglement metrics encode observations alone; this model takes --fields {experiment.config.fields}")
    if sites.discrete or sites.global_latents:
        raise PyrovaeError("the disentanglement metrics score continuous per-example codes; this model has discrete or global latents")
    guide = experiment.guide

    @torch.no_grad()
    def represent(observations: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(observations, dtype=np.float32), device=experiment.device)
        codes = []
        for part in x.split(CHUNK):
            means = encode(guide, sites, part)
            codes.append(torch.cat([means[name].reshape(len(part), -1) for name in sites.latents], dim=1))
        return torch.cat(codes).cpu().double().numpy()

    return represent


def score_run(experiment: Experiment, metrics: Sequence[str] = METRICS, seed: int = 0, points: int | None = None) -> dict[str, Any]:
    """The named metrics of the run's representation, with Locatello et al.'s sample sizes
    (10,000 training and 5,000 evaluation points), or `points` training and `points` // 2
    evaluation points for a quick look."""
    truth = experiment.data.ground_truth
    if truth is None:
        raise PyrovaeError(f"data set {experiment.data.name!r} has no ground-truth factors to score a representation by: use --dataset dsprites")
    sizes: dict[str, int] = {}
    if points is not None:
        if isinstance(points, bool) or not isinstance(points, int) or points < 100:
            raise PyrovaeError(f"--points must be a whole number >= 100, got {points!r}")
        wanted = {"train_points": points, "eval_points": points // 2, "test_points": points // 2, "variance_points": points, "points": points}
        sizes = {key: wanted[key] for name in metrics for key in SETTINGS.get(name, ()) if key in wanted}
    experiment.train_mode(False)
    start = time.perf_counter()
    values = score(truth, encoder(experiment), metrics, seed=seed, **sizes)
    return {"model": experiment.config.model, "guide": experiment.config.guide, "method": experiment.config.method,
            "objective": experiment.config.objective, "beta": experiment.config.beta, "dataset": experiment.config.dataset,
            "seed": seed, "points": points or 10000, **values, "score_seconds": time.perf_counter() - start}
