"""The training loop shared by every inference method: epochs, warm-up, checkpoints, resume."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyro
import torch
from tqdm.auto import tqdm

from pyrovae.data import Dataset, minibatches
from pyrovae.errors import PyrovaeError
from pyrovae.infer.base import InferenceMethod
from pyrovae.run import RunDir

__all__ = ["History", "train"]


@dataclass
class History:
    """One row per finished epoch: train loss, validation ELBO (nats/example), seconds."""

    rows: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def epochs(self) -> int:
        return len(self.rows)

    @property
    def train_seconds(self) -> float:
        return sum(r["seconds"] for r in self.rows)

    def best(self) -> dict[str, float] | None:
        scored = [r for r in self.rows if r.get("valid_elbo") is not None]
        return max(scored, key=lambda r: r["valid_elbo"]) if scored else None


def warmup_beta(step: int, warmup_steps: int) -> float:
    """KL weight ramping linearly from 1/warmup_steps to 1 (sec. 2.8: KL annealing)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def train(
    method: InferenceMethod,
    data: Dataset,
    epochs: int,
    *,
    seed: int = 0,
    warmup_epochs: float = 0.0,
    patience: int | None = None,
    run: RunDir | None = None,
    resume: bool = False,
    validate: Callable[[], float] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> History:
    """Train `method` on `data`'s train split for `epochs` epochs.

    Args:
        seed: seeds the minibatch order and every random draw; a run is reproducible.
        warmup_epochs: epochs over which latent sites' weight ramps from 0 to 1.
        patience: stop when the validation ELBO has not improved for this many epochs, and
            keep the best state (needs `validate`).
        run: where the checkpoint goes after every epoch (atomically).
        resume: continue the run's checkpoint exactly where it stopped.
        validate: returns the validation ELBO (nats per example, higher is better).
    """
    train_split = data.split("train")
    num = len(train_split)
    batch_size = method.settings.batch_size
    if batch_size < 1:
        raise PyrovaeError(f"--batch-size must be positive, got {batch_size}")
    steps_per_epoch = math.ceil(num / batch_size)
    generator = torch.Generator().manual_seed(seed)
    pyro.set_rng_seed(seed)
    history, best_state, step = History(), None, 0
    if resume:
        if run is None:
            raise PyrovaeError("resuming needs a run directory")
        checkpoint = run.load_checkpoint()
        method.load_state_dict(checkpoint["method"])
        generator.set_state(checkpoint["generator"])
        torch.set_rng_state(checkpoint["torch_rng"])
        history = History(checkpoint["history"], checkpoint.get("stopped_early", False))
        best_state, step = checkpoint.get("best_state"), checkpoint["step"]
    bar = tqdm(total=(epochs - history.epochs) * steps_per_epoch, disable=None if progress else True, unit="batch", dynamic_ncols=True, leave=False)
    running = None
    while history.epochs < epochs and not history.stopped_early:
        epoch = history.epochs
        start, total, seen = time.perf_counter(), 0.0, 0
        for index in minibatches(num, batch_size, generator):
            x = data.batch("train", index, generator).to(device)
            loss = method.step(x, index.to(device), warmup_beta(step, int(warmup_epochs * steps_per_epoch)))
            if not math.isfinite(loss):
                bar.close()
                kept = f"; the last good checkpoint (epoch {epoch}) is kept in {run.path}" if run and run.checkpoint.exists() else ""
                raise PyrovaeError(f"the loss became {loss} at epoch {epoch + 1}, step {step + 1}: lower --lr or check the data{kept}")
            total, seen, step = total + loss * len(index), seen + len(index), step + 1
            running = loss if running is None else 0.95 * running + 0.05 * loss
            bar.set_postfix(epoch=epoch + 1, loss=f"{running:.2f}")
            bar.update()
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": total / seen, "seconds": time.perf_counter() - start}
        if validate is not None:
            row["valid_elbo"] = validate()
        history.rows.append(row)
        if patience is not None and validate is not None:
            best = history.best()
            if best is row:
                best_state = copy.deepcopy(method.state_dict())
            elif history.epochs - best["epoch"] >= patience:
                history.stopped_early = True
                method.load_state_dict(best_state)
        if run is not None:
            run.save_checkpoint(
                {
                    "method": method.state_dict(),
                    "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "history": history.rows,
                    "stopped_early": history.stopped_early,
                    "best_state": best_state,
                    "step": step,
                }
            )
    bar.close()
    return history
