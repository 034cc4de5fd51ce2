"""Per-example ELBO, IWAE-k bound and importance-sampled log p(x) for any (model, guide).

log p(x) ~= log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x) (Kingma & Welling 2019,
sec. 2.6), computed in chunks of examples and samples so that memory stays bounded for
K up to thousands. Works on every Pyro program whose latent sites sit in a per-example plate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from pyrovae.batch import Batch, Data, as_batch, per_example
from pyrovae.capture import CapturedLoss
from pyrovae.enumeration import weights_for
from pyrovae.errors import PyrovaeError
from pyrovae.importance import log_weights
from pyrovae.protocols import guide_traits, model_traits
from pyrovae.sites import ModelSites, inspect_model

__all__ = ["Evaluation", "evaluate", "chunk_sizes", "default_max_elements"]


@dataclass
class Evaluation:
    """Per-example figures in nats (higher is better); `log_likelihood` is the IS estimate."""

    elbo: torch.Tensor
    log_likelihood: torch.Tensor
    iwae: torch.Tensor | None
    num_samples: int
    iwae_k: int | None

    @classmethod
    def concat(cls, parts: list[Evaluation]) -> Evaluation:
        """One evaluation of the examples of `parts`, in order (IWAE bounds dropped)."""
        return cls(elbo=torch.cat([p.elbo for p in parts]), log_likelihood=torch.cat([p.log_likelihood for p in parts]),
                   iwae=None, num_samples=parts[0].num_samples, iwae_k=None)

    def summary(self, lengths: torch.Tensor | None = None) -> dict[str, float | int | None]:
        """Means over the examples, each with its standard error (the spread over examples, /sqrt(N));
        with the `lengths` of sequences also the totals per time step (Krishnan et al. 2017's
        figure: the sum over the sequences divided by their summed lengths)."""
        gap = self.log_likelihood - self.elbo
        stderr = lambda v: v.std().item() / math.sqrt(len(v)) if len(v) > 1 else None  # noqa: E731
        per_step = {}
        if lengths is not None:
            steps = lengths[: len(self.elbo)].sum().item()
            per_step = {"elbo_per_step": self.elbo.sum().item() / steps, "log_likelihood_per_step": self.log_likelihood.sum().item() / steps}
        return {**per_step,
            "examples": len(self.elbo),
            "elbo": self.elbo.mean().item(),
            "log_likelihood": self.log_likelihood.mean().item(),
            "gap": gap.mean().item(),
            "elbo_stderr": stderr(self.elbo), "log_likelihood_stderr": stderr(self.log_likelihood), "gap_stderr": stderr(gap),
            "iwae": None if self.iwae is None else self.iwae.mean().item(),
            "iwae_k": self.iwae_k,
            "num_samples": self.num_samples,
        }


def chunk_sizes(num_examples: int, num_samples: int, width: int, max_elements: int, multiple: int = 1) -> tuple[int, int]:
    """(examples, samples) per chunk so that samples * examples * width <= max_elements."""
    examples = max(1, min(num_examples, max_elements // max(width * min(num_samples, 64), 1)))
    samples = max(multiple, (max_elements // (width * examples)) // multiple * multiple)
    return examples, min(samples, math.ceil(num_samples / multiple) * multiple)


def default_max_elements(device: torch.device | str) -> int:
    """Floats held at once per chunk: 64 MB on a CPU (cache-sized passes, low peak memory),
    512 MB on a GPU (fewer, larger kernels)."""
    return 2**27 if torch.device(device).type == "cuda" else 2**24


@torch.no_grad()
def evaluate(
    model: Callable,
    guide: Callable,
    x: Data | Iterable[Data],
    num_samples: int = 1000,
    iwae_k: int | None = None,
    max_elements: int | None = None,
    progress: Callable[[int], None] | None = None,
    capture: bool | None = None,
    plate: str | None = None,
) -> Evaluation:
    """Score each example of `x` with `num_samples` draws from the guide.

    Args:
        model, guide: a Pyro model and guide taking the data's arguments.
        x: the data (a tensor (N, ...), a tuple of positional or a dict of keyword arguments,
            or a `pyrovae.batch.Batch`), or a list or iterator of such batches.
        num_samples: K, importance samples per example.
        iwae_k: if given (dividing K), also the IWAE-k bound averaged over K / k groups.
        max_elements: bound on samples x examples x data size held at once (memory cap); by
            default `default_max_elements` of the data's device.
        progress: called with the number of examples finished after each chunk.
        capture: replay the log-weights from a captured graph (`pyrovae.capture`, checked against
            the program); by default when the model and guide are modules, the data one tensor,
            and the evaluation takes at least `CAPTURE_FROM_PASSES` vectorized passes.
        plate: the per-example plate (`pyrovae.sites.inspect_model`).

    Sites the model enumerates (``infer={"enumerate": "parallel"}``) are summed out exactly
    (`pyrovae.enumeration`); importance sampling covers the sites the guide samples.
    """
    if num_samples < 1:
        raise PyrovaeError(f"--samples must be at least 1, got {num_samples}")
    if not guide_traits(guide).gives_elbo:
        raise PyrovaeError(
            f"{type(guide).__name__} is a point estimate: it gives no ELBO and no importance-sampled log p(x); "
            "score its decoder with a proposal fitted per example instead (pyrovae evaluate RUN --proposal fitted)"
        )
    if iwae_k is not None and (iwae_k < 1 or num_samples % iwae_k):
        raise PyrovaeError(f"the IWAE k ({iwae_k}) must divide the number of samples ({num_samples})")
    one = torch.is_tensor(x) or isinstance(x, (tuple, dict, Batch))
    batches = [as_batch(cast(Data, x))] if one else [as_batch(b) for b in cast(Iterable[Data], x)]
    if not batches or sum(len(b) for b in batches) == 0:
        raise PyrovaeError("nothing to evaluate: the data split is empty")
    max_elements = max_elements or default_max_elements(batches[0].device)
    sites = inspect_model(model, batches[0], plate=plate)
    sites.refuse_subsampled("a per-example score")
    if sites.global_latents:
        raise PyrovaeError(
            f"the model has global latent(s) {', '.join(map(repr, sites.global_latents))}: log p(x) and the ELBO do not "
            "factor per example, so there is no per-example score; pyrovae.dataset_bound.dataset_elbo gives the data set's ELBO"
        )
    nesting = sites.max_plate_nesting
    if not sites.latents and not sites.enumerated:  # a fully observed model: one "sample" gives the exact log p(x)
        num_samples, iwae_k = 1, (1 if iwae_k else None)
    # the floats one sample costs: the data size, or what the model declares (e.g. a PixelCNN's activations)
    width = model_traits(model).elements_per_sample or math.prod(batches[0].primary.shape[1:]) or 1
    width *= max([1] + [_cardinality(sites.supports[n]) for n in sites.enumerated])
    plans = [chunk_sizes(len(batch), num_samples, width, max_elements, iwae_k or 1) for batch in batches]
    capturable = all(b.is_tensor for b in batches) and not sites.enumerated
    if capture is None:
        passes = sum(math.ceil(len(b) / step) * math.ceil(num_samples / samples) for b, (step, samples) in zip(batches, plans))
        capture = passes >= CAPTURE_FROM_PASSES
    captured = _captured_log_weights(model, guide, nesting, sites.plate) if capture and capturable else None
    weigh = captured or _eager_log_weights(model, guide, nesting, sites)
    elbos, lls, iwaes = [], [], []
    for batch, (step, samples) in zip(batches, plans):
        for start in range(0, len(batch), step):
            chunk = batch[start : start + step]
            elbo, ll, iwae = _score_chunk(weigh, chunk, num_samples, samples, iwae_k)
            elbos.append(elbo)
            lls.append(ll)
            iwaes.append(iwae)
            if progress:
                progress(len(chunk))
    return Evaluation(
        elbo=torch.cat(elbos),
        log_likelihood=torch.cat(lls),
        iwae=torch.cat(iwaes) if iwae_k else None,
        num_samples=num_samples,
        iwae_k=iwae_k,
    )


def _cardinality(support: Any) -> int:
    """How many values an enumerated site takes (memory per sample grows by it)."""
    try:
        return int(support.upper_bound) + 1
    except (AttributeError, TypeError, ValueError):
        return 2


def _eager_log_weights(model: Callable, guide: Callable, nesting: int, sites: ModelSites) -> Callable[[Batch, int], torch.Tensor]:
    weights = weights_for(sites)

    def weigh(batch: Batch, k: int) -> torch.Tensor:
        def one_call(part: Batch) -> torch.Tensor:
            args, kwargs = part.call_args()
            return weights(model, guide, k, nesting, *args, plate_name=sites.plate, **kwargs).values

        return per_example(batch, one_call)

    return weigh


# Capturing costs a trace and a checked eager pass: worth it for the long evaluations only.
CAPTURE_FROM_PASSES = 32
# The graphs of the last (model, guide) pair, kept across calls (parameters are graph inputs).
# One pair only: the captured program holds its modules, so a longer cache would keep them alive.
_captured: dict[tuple[int, int], CapturedLoss] = {}


def _captured_log_weights(model: Callable, guide: Callable, nesting: int, plate: str) -> Callable[[Batch, int], torch.Tensor] | None:
    """`(x, k) -> log w (k, B)` replayed from graphs captured per shape, or None for programs
    that are not modules."""
    if not (isinstance(model, nn.Module) and isinstance(guide, nn.Module)):
        return None
    key = (id(model), id(guide))  # a program's plate and nesting are its own: not part of the key
    if key not in _captured:  # ids are safe: the kept program holds both modules alive
        def weights(x: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
            return log_weights(model, guide, k, nesting, x, plate_name=plate).values

        _captured.clear()
        _captured[key] = CapturedLoss(weights, nn.ModuleList([model, guide]))
    captured = _captured[key]
    return lambda batch, k: captured(batch.primary, batch.primary.new_empty(0, dtype=torch.long), k)


def _score_chunk(weigh, x, num_samples, per_pass, iwae_k):
    lse_parts, total, iwae_total = [], 0.0, 0.0
    done = 0
    while done < num_samples:
        k = min(per_pass, num_samples - done)
        w = weigh(x, k)  # (k, B)
        if not torch.isfinite(w).all():
            raise PyrovaeError("non-finite importance weights: the guide puts mass where the model has none, or the parameters diverged")
        lse_parts.append(torch.logsumexp(w, 0))
        total = total + w.sum(0)
        if iwae_k:
            groups = w.reshape(k // iwae_k, iwae_k, -1)
            iwae_total = iwae_total + (torch.logsumexp(groups, 1) - math.log(iwae_k)).sum(0)
        done += k
    ll = torch.logsumexp(torch.stack(lse_parts), 0) - math.log(num_samples)
    iwae = iwae_total / (num_samples // iwae_k) if iwae_k else None
    return total / num_samples, ll, iwae
