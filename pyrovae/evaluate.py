"""Per-example ELBO, IWAE-k bound and importance-sampled log p(x) for any (model, guide).

log p(x) ~= log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x) (Kingma & Welling 2019,
sec. 2.6), computed in chunks of examples and samples so that memory stays bounded for
K up to thousands. Works on every Pyro program whose sites sit in a ``"data"`` plate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from pyrovae.capture import CapturedLoss
from pyrovae.errors import PyrovaeError
from pyrovae.importance import log_weights
from pyrovae.sites import inspect_model

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

    def summary(self) -> dict[str, float | int | None]:
        return {
            "examples": len(self.elbo),
            "elbo": self.elbo.mean().item(),
            "log_likelihood": self.log_likelihood.mean().item(),
            "gap": (self.log_likelihood - self.elbo).mean().item(),
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
    x: torch.Tensor | Iterable[torch.Tensor],
    num_samples: int = 1000,
    iwae_k: int | None = None,
    max_elements: int | None = None,
    progress: Callable[[int], None] | None = None,
    capture: bool | None = None,
) -> Evaluation:
    """Score each example of `x` with `num_samples` draws from the guide.

    Args:
        model, guide: a Pyro model and guide taking a batch `x` as first argument.
        x: a data tensor (N, ...), or an iterable of such batches.
        num_samples: K, importance samples per example.
        iwae_k: if given (dividing K), also the IWAE-k bound averaged over K / k groups.
        max_elements: bound on samples x examples x data size held at once (memory cap); by
            default `default_max_elements` of the data's device.
        progress: called with the number of examples finished after each chunk.
        capture: replay the log-weights from a captured graph (`pyrovae.capture`, checked against
            the program); by default when the model and guide are modules and the evaluation
            takes at least `CAPTURE_FROM_PASSES` vectorized passes.
    """
    if num_samples < 1:
        raise PyrovaeError(f"--samples must be at least 1, got {num_samples}")
    if not getattr(guide, "gives_elbo", True):
        raise PyrovaeError(
            f"{type(guide).__name__} is a point estimate: it gives no ELBO and no importance-sampled log p(x); "
            "score its decoder with a proposal fitted per example instead"
        )
    if iwae_k is not None and (iwae_k < 1 or num_samples % iwae_k):
        raise PyrovaeError(f"the IWAE k ({iwae_k}) must divide the number of samples ({num_samples})")
    batches = [x] if torch.is_tensor(x) else list(x)
    if not batches or sum(len(b) for b in batches) == 0:
        raise PyrovaeError("nothing to evaluate: the data split is empty")
    max_elements = max_elements or default_max_elements(batches[0].device)
    sites = inspect_model(model, batches[0])
    nesting = sites.max_plate_nesting
    if not sites.latents:  # a fully observed model: one "sample" gives the exact log p(x)
        num_samples, iwae_k = 1, (1 if iwae_k else None)
    # the floats one sample costs: the data size, or what the model declares (e.g. a PixelCNN's activations)
    width = getattr(model, "elements_per_sample", None) or math.prod(batches[0].shape[1:]) or 1
    plans = [chunk_sizes(len(batch), num_samples, width, max_elements, iwae_k or 1) for batch in batches]
    if capture is None:
        passes = sum(math.ceil(len(b) / step) * math.ceil(num_samples / samples) for b, (step, samples) in zip(batches, plans))
        capture = passes >= CAPTURE_FROM_PASSES
    weigh = _captured_log_weights(model, guide, nesting) if capture else None
    weigh = weigh or (lambda x, k: log_weights(model, guide, k, nesting, x).values)
    elbos, lls, iwaes = [], [], []
    for batch, (step, samples) in zip(batches, plans):
        for start in range(0, len(batch), step):
            chunk = batch[start : start + step]
            elbo, ll, iwae = _score_chunk(weigh, chunk, num_samples, samples, iwae_k)
            elbos.append(elbo), lls.append(ll), iwaes.append(iwae)
            if progress:
                progress(len(chunk))
    return Evaluation(
        elbo=torch.cat(elbos),
        log_likelihood=torch.cat(lls),
        iwae=torch.cat(iwaes) if iwae_k else None,
        num_samples=num_samples,
        iwae_k=iwae_k,
    )


# Capturing costs a trace and a checked eager pass: worth it for the long evaluations only.
CAPTURE_FROM_PASSES = 32
# The graphs of the last (model, guide) pair, kept across calls (parameters are graph inputs).
# One pair only: the captured program holds its modules, so a longer cache would keep them alive.
_captured: dict[tuple[int, int], CapturedLoss] = {}


def _captured_log_weights(model: Callable, guide: Callable, nesting: int) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
    """`(x, k) -> log w (k, B)` replayed from graphs captured per shape, or None for programs
    that are not modules."""
    if not (isinstance(model, nn.Module) and isinstance(guide, nn.Module)):
        return None
    key = (id(model), id(guide))
    if key not in _captured:  # ids are safe: the kept program holds both modules alive
        def weights(x: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
            return log_weights(model, guide, k, nesting, x).values

        _captured.clear()
        _captured[key] = CapturedLoss(weights, nn.ModuleList([model, guide]))
    captured = _captured[key]
    return lambda x, k: captured(x, x.new_empty(0, dtype=torch.long), k)


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
