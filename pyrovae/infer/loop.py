"""The training loop shared by every inference method: epochs, warm-up, checkpoints, resume."""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from pyrovae import distributed
from pyrovae.data import UNLABELLED, Dataset, minibatches, stratified_minibatches
from pyrovae.errors import PyrovaeError
from pyrovae.files import one_line
from pyrovae.infer.base import InferenceMethod
from pyrovae.programs import program_modules, unique
from pyrovae.run import RunDir
from pyrovae.schedules import apply_schedule

__all__ = ["History", "ranked_step", "rank_seed", "restore", "synced_state", "train", "warmup_beta"]


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


# On a GPU, reading a loss waits for every queued kernel: losses are read in groups, so that
# the host queues the next steps while the device works. A non-finite loss is still reported
# with its own step number, at most READ_EVERY steps later.
READ_EVERY = 50


def _read(losses: list[Any]) -> list[float]:
    """Floats of losses that may be 0-dim tensors on a device: one transfer for all of them."""
    if all(torch.is_tensor(loss) for loss in losses):
        return torch.stack([loss.detach().reshape(()).double() for loss in losses]).tolist()
    return [float(loss) for loss in losses]


def warmup_beta(step: int, warmup_steps: int, start: float = 0.0) -> float:
    """KL weight ramping linearly from `start` to 1 over `warmup_steps` (sec. 2.8: KL annealing);
    step s (from 0) weighs start + (1 - start) (s + 1) / warmup_steps, as Pyro's dmm.py does."""
    return 1.0 if warmup_steps <= 0 else min(1.0, start + (1.0 - start) * (step + 1) / warmup_steps)


def restore(method: InferenceMethod, state: dict[str, Any], run: RunDir) -> None:
    """Load a checkpoint's method state, refusing in one line one that another architecture wrote."""
    try:
        method.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as error:
        detail = f"it has no {error.args[0]!r} state" if isinstance(error, KeyError) else one_line(error)
        raise PyrovaeError(f"the checkpoint does not match config.json in {run.path} (was config.json edited?): {detail}") from error


def _save(run: RunDir, method: InferenceMethod, generator: torch.Generator, history: History, best_state: Any, step: int,
          device: torch.device | str, writes: bool = True) -> None:
    """Everything a resume needs to continue bit for bit; plain tensors, numbers, lists and dicts
    only. Across ranks: every rank's noise state, gathered; rank 0 (`writes`) writes."""
    group = distributed.current()
    ranked = {} if group is None else {"ranks": group.size, "rank_rng": distributed.gather_states(torch.get_rng_state(), group)}
    if not writes:
        return
    run.save_checkpoint(
        {
            **ranked,
            "method": method.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state(device)} if torch.device(device).type == "cuda" else {}),
            "history": history.rows,
            "stopped_early": history.stopped_early,
            "best_state": best_state,
            "step": step,
        }
    )


def train(
    method: InferenceMethod,
    data: Dataset,
    epochs: int,
    *,
    seed: int = 0,
    warmup_epochs: float = 0.0,
    warmup_from: float = 0.0,
    beta: float = 1.0,
    schedule: str = "constant",
    patience: int | None = None,
    run: RunDir | None = None,
    resume: bool = False,
    checkpoint: dict[str, Any] | None = None,
    validate: Callable[[], float] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    on_epoch: Callable[[History], None] | None = None,
) -> History:
    """Train `method` on `data`'s train split for `epochs` epochs.

    Args:
        seed: seeds the minibatch order and every random draw; a run is reproducible.
        warmup_epochs: epochs over which latent sites' weight ramps from `warmup_from * beta` to `beta`.
        beta: the latent sites' weight after warm-up: the beta-VAE objective
            E[log p(x|z)] - beta KL(q || p) (Higgins et al. 2017, eq. 4); 1 is the ELBO.
        schedule: the learning rate over epochs (`pyrovae.schedules`), set at each epoch's start.
        patience: stop when the validation ELBO has not improved for this many epochs, and
            keep the best state (needs `validate`).
        run: where the checkpoint goes after every epoch (atomically).
        resume: continue the run's checkpoint exactly where it stopped; otherwise the run gets
            the epoch-0 checkpoint first, so that it can be resumed from its first step on.
        checkpoint: the run's checkpoint when the caller has loaded it already.
        validate: returns the validation ELBO (nats per example, higher is better).
        progress: a progress bar where stderr is a terminal.
        log: called with one line per epoch (loss, validation bound, examples per second,
            elapsed seconds), written above the bar, whether or not a terminal is attached.
        on_epoch: called with the history after each epoch, before its checkpoint, on a fork
            of the random state: what it draws does not change the training run.
    """
    train_split = data.split("train")
    num = len(train_split)
    batch_size = method.settings.batch_size
    if batch_size < 1:
        raise PyrovaeError(f"--batch-size must be positive, got {batch_size}")
    group = distributed.current()
    ranks = 1 if group is None else group.size
    stratified = method.settings.labelled_per_batch
    if stratified:
        if group is not None:
            raise PyrovaeError("--labelled-per-batch trains in one process: drop --nproc (or torchrun)")
        if train_split.y is None:
            raise PyrovaeError("--labelled-per-batch needs a data set with labels")
        labelled = train_split.y != UNLABELLED
        steps_per_epoch = math.ceil(int((~labelled).sum()) / (batch_size - stratified))
    else:
        steps_per_epoch = math.ceil(num / (ranks * batch_size))
    generator = torch.Generator().manual_seed(seed)  # the minibatch order: the same on every rank
    pyro.set_rng_seed(seed if group is None else rank_seed(seed, group.rank))
    history, best_state, step = History(), None, 0
    train_data = data.to(device)  # the rows travel once; a step gathers its batch where it runs
    # the programs' param-store parameters exist before a checkpoint is written or read
    first = data.first_rows("train", batch_size).to(train_data.device)
    method.prepare(train_data.batch("train", first, torch.Generator().manual_seed(seed)))
    writes = run is not None and (group is None or group.main)
    if resume:
        if run is None:
            raise PyrovaeError("resuming needs a run directory")
        checkpoint = run.load_checkpoint() if checkpoint is None else checkpoint
        saved_ranks = checkpoint.get("ranks", 1)
        if saved_ranks != ranks:
            raise PyrovaeError(f"{run.path} was trained by {saved_ranks} process(es): resume it with {'--nproc ' + str(saved_ranks) if saved_ranks > 1 else 'one process'}, not {ranks}")
        restore(method, checkpoint["method"], run)
        generator.set_state(checkpoint["generator"])
        torch.set_rng_state(checkpoint["torch_rng"] if group is None else checkpoint["rank_rng"][group.rank])
        if "cuda_rng" in checkpoint and torch.device(device).type == "cuda":
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
        history = History(checkpoint["history"], checkpoint.get("stopped_early", False))
        best_state, step = checkpoint.get("best_state"), checkpoint["step"]
    if group is not None:
        distributed.broadcast_tensors(synced_state(method))  # rank 0's initial parameters everywhere
    if run is not None and not resume:
        _save(run, method, generator, history, best_state, step, device, writes)  # epoch 0: a run always has a checkpoint
    averager = distributed.GradientAverager(method.optimizers(), group) if group is not None else None
    with averager.installed() if averager is not None else contextlib.nullcontext():
        # no tqdm at all without a bar: even a disabled one takes tqdm's process-wide lock (and starts its
        # monitor thread), and a process killed holding it blocks every process forked from the same parent
        total = (epochs - history.epochs) * steps_per_epoch
        bar = tqdm(total=total, disable=None, unit="batch", dynamic_ncols=True) if progress else _NoBar()
        running, began = None, time.perf_counter()
        shown: dict[str, str] = {}  # the last validation bound, on the bar
        while history.epochs < epochs and not history.stopped_early:
            epoch = history.epochs
            apply_schedule(method.optimizers(), schedule, epoch)
            start, total, seen = time.perf_counter(), 0.0, 0
            pending: list[tuple[Any, int, float]] = []  # (loss, examples, weight) not read yet: reading one waits for the device

            def read_losses() -> None:
                nonlocal total, seen, running
                values = _read([loss for loss, _, _ in pending])
                if group is not None:  # the global minibatch's loss: the ranks' losses weighted by their shares
                    values = distributed.reduce_sum(torch.tensor(values, dtype=torch.float64) * torch.tensor([w for _, _, w in pending], dtype=torch.float64)).tolist()
                for i, (value, (_, size, _)) in enumerate(zip(values, pending)):
                    if not math.isfinite(value):
                        bar.close()
                        kept = f"; the last good checkpoint (epoch {epoch}) is kept in {run.path}" if run and run.checkpoint.exists() else ""
                        at = step - len(pending) + i + 1
                        raise PyrovaeError(f"the loss became {value} at epoch {epoch + 1}, step {at}: lower --lr or check the data{kept}")
                    total, seen = total + value * size, seen + size
                    running = value if running is None else 0.95 * running + 0.05 * value
                bar.set_postfix(epoch=epoch + 1, loss=f"{running:.2f}", **shown)
                pending.clear()

            batches = (stratified_minibatches(labelled, batch_size, stratified, generator, device=train_data.device) if stratified
                       else ((index, None) for index in minibatches(num, ranks * batch_size, generator, device=train_data.device)))
            for index, weights in batches:
                x = train_data.batch("train", index, generator)
                weight = beta * warmup_beta(step, int(warmup_epochs * steps_per_epoch), warmup_from)
                if group is None:
                    loss = method.step(x, index, weight) if weights is None else method.step(x, index, weight, weights=weights)
                    pending.append((loss, len(index), 1.0))
                else:
                    loss, share = ranked_step(method, x, index, weight, group, averager)
                    pending.append((loss, len(index), share))
                step += 1
                bar.update()
                if len(pending) == READ_EVERY:
                    read_losses()
            if pending:
                read_losses()
            row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": total / seen, "seconds": time.perf_counter() - start}
            if validate is not None:
                row["valid_elbo"] = validate()
                shown = {"valid_elbo": f"{row['valid_elbo']:.2f}"}
                bar.set_postfix(epoch=epoch + 1, loss=f"{running:.2f}", **shown)
            history.rows.append(row)
            if on_epoch is not None:
                with torch.random.fork_rng(devices=None if torch.device(device).type == "cuda" else []):
                    on_epoch(history)
            if log is not None:
                line = _epoch_line(row, epochs, num, time.perf_counter() - began)
                if bar.disable:
                    log(line)
                else:
                    bar.write(line)
            if patience is not None and validate is not None:
                best = history.best()
                if best is row:
                    best_state = copy.deepcopy(method.state_dict())
                elif history.epochs - best["epoch"] >= patience:
                    history.stopped_early = True
                    method.load_state_dict(best_state)
            if run is not None:
                _save(run, method, generator, history, best_state, step, device, writes)
    bar.close()
    return history


def rank_seed(seed: int, rank: int) -> int:
    """Rank `rank`'s noise seed: `seed` itself on rank 0, a well-mixed other 32-bit seed elsewhere."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def synced_state(method: InferenceMethod) -> list[torch.Tensor]:
    """What every rank must hold alike: each optimized tensor, the method's parameters, and the
    programs' module buffers (in one order on every rank)."""
    tensors = [p for optimizer in method.optimizers() for g in optimizer.param_groups for p in g["params"]]
    return unique([*tensors, *method.parameters(), *_buffers(method)])


def _buffers(method: InferenceMethod) -> list[torch.Tensor]:
    return [b for module in (*program_modules(method.model), *program_modules(method.guide)) for b in module.buffers()]


def ranked_step(method: InferenceMethod, x: Any, index: torch.Tensor, beta: float, group: distributed.Group,
                 averager: distributed.GradientAverager | None) -> tuple[Any, float]:
    """One step of this rank on its share of the global minibatch (`x`, `index`); then the rows of
    per-example state every rank changed are exchanged and module buffers follow rank 0's."""
    shares = distributed.shard(len(index), group)
    mine = shares[group.rank]
    assert averager is not None
    averager.weight = mine.weight
    loss = method.step(x[mine.part], index[mine.part], beta)
    tables = method.per_example_state()
    if tables:
        distributed.exchange_rows(tables, index, shares, group)
    buffers = _buffers(method)
    if buffers:
        distributed.broadcast_tensors(buffers)
    return loss, mine.weight


def _epoch_line(row: dict[str, Any], epochs: int, examples: int, elapsed: float) -> str:
    """``epoch 3/50  loss 25.41  valid ELBO -25.48  14300 examples/s  2.1 s``."""
    valid = f"  valid ELBO {row['valid_elbo']:.2f}" if "valid_elbo" in row else ""
    return (f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.2f}{valid}  "
            f"{examples / max(row['seconds'], 1e-9):.0f} examples/s  {elapsed:.1f} s")


class _NoBar:
    """What `train` uses of a tqdm bar, doing nothing."""

    disable = True

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def write(self, line: str) -> None:
        pass

    def close(self) -> None:
        pass
