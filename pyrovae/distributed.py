"""Data-parallel training on `torch.distributed`, with DDP's semantics for any inference method.

N processes ("ranks") each hold the whole model. Every rank draws the same minibatch order and
the same global minibatch of N * B examples, and steps on its own contiguous share of it, with
its own noise. Before every optimizer step the gradients are averaged across ranks, each rank's
weighted by its share of the minibatch, so that N ranks at batch B take the step one process
takes at batch N * B (up to floating point and the noise). Sparse gradients (the local method's
per-example tables) are summed row by row; per-example states a step changes without a gradient
(MCMC-EM's chains) are exchanged row by row, so each example's state is the one its rank left.

Why not `torch.nn.parallel.DistributedDataParallel`: it wraps one module's forward, while a
pyrovae step is a Pyro program run through an ELBO, sometimes with several optimizers (a
critic's, the local method's two), gradients from `autograd.grad`, or sparse tables; averaging at
`Optimizer.step` covers all of them with one rule. Limits: buffers (batch norm's running
statistics) follow rank 0's after every step, as DDP's ``broadcast_buffers`` does, so they are
those of rank 0's share rather than of the whole minibatch.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Group", "Share", "current", "from_environment", "GradientAverager", "average_now", "broadcast_tensors", "exchange_rows",
           "gather_examples", "gather_rows", "gather_states", "leave", "reduce_sum", "shard", "split_examples"]

TIMEOUT = datetime.timedelta(minutes=10)  # a rank that stops answering fails the others after this long


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks of a training run."""

    rank: int
    size: int

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run directory and logs."""
        return self.rank == 0


def current() -> Group | None:
    """The process group this process trains in, or None when it trains alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return Group(dist.get_rank(), dist.get_world_size())


def from_environment(device: torch.device) -> Group | None:
    """Join the process group that `torchrun` (or ``pyrovae fit --nproc``) describes in the
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): gloo on CPUs, NCCL on GPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        atexit.register(_leave)  # a process that exits holding a gloo group aborts in its threads' destructors
    return current()


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def leave() -> None:
    """After a run every rank finished: wait for the others, then leave the group (rank 0 hosts
    its store, and a rank still talking to it when rank 0 exits aborts)."""
    if current() is not None:
        dist.barrier()
    _leave()


@dataclass(frozen=True)
class Share:
    """A rank's part of a global minibatch: a slice of it, and its weight (examples / total);
    a rank left without examples steps on one stand-in example with weight 0."""

    part: slice
    weight: float


def split_examples(count: int, group: Group) -> slice:
    """Rank `group.rank`'s contiguous slice of `count` examples: slices differ by at most one."""
    base, extra = divmod(count, group.size)
    start = group.rank * base + min(group.rank, extra)
    return slice(start, start + base + (group.rank < extra))


def shard(size: int, group: Group) -> list[Share]:
    """Every rank's share of a global minibatch of `size` examples, in rank order."""
    shares = []
    for rank in range(group.size):
        part = split_examples(size, Group(rank, group.size))
        shares.append(Share(part, (part.stop - part.start) / size) if part.stop > part.start else Share(slice(0, 1), 0.0))
    return shares


def _device(tensors: Iterable[torch.Tensor]) -> torch.device:
    return next(iter(tensors), torch.empty(0)).device


def reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a tensor (a copy)."""
    total = values.clone()
    dist.all_reduce(total)
    return total


def gather_rows(rows: torch.Tensor, counts: list[int], group: Group) -> list[torch.Tensor]:
    """Every rank's `rows` (its `counts[rank]` of them along the first dimension), in rank order:
    all-gathered padded to the longest, as the collective needs equal shapes, and cut back."""
    padded = torch.zeros(max(counts), *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    padded[: len(rows)] = rows
    return [part[:count] for part, count in zip(gather_states(padded, group), counts)]


def gather_examples(values: torch.Tensor, group: Group) -> torch.Tensor:
    """Per-example rows of every rank's contiguous slice, concatenated in rank order (the
    original order): slices may differ in length by one."""
    counts = [int(n.item()) for n in gather_states(torch.tensor([len(values)], device=values.device), group)]
    return torch.cat(gather_rows(values, counts, group))


def gather_states(state: torch.Tensor, group: Group) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor (a random generator's state), in rank order."""
    parts = [torch.empty_like(state) for _ in range(group.size)]
    dist.all_gather(parts, state)
    return parts


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite every rank's tensors with rank 0's, in place (the same order on every rank)."""
    for tensor in tensors:
        dist.broadcast(tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor, src=0)


@torch.no_grad()
def exchange_rows(tables: Iterable[torch.Tensor], index: torch.Tensor, shares: list[Share], group: Group) -> None:
    """After a step, write into every rank's per-example `tables` the rows each rank changed:
    rank r's rows are those of its share of the global minibatch `index`."""
    own, counts = index[shares[group.rank].part], [s.part.stop - s.part.start for s in shares]
    for table in tables:
        for share, part in zip(shares, gather_rows(table[own], counts, group)):
            if share.weight > 0:
                table[index[share.part]] = part


def _average_dense(params: list[torch.Tensor], weight: float) -> None:
    """Sum over ranks of weight * grad, with a flag per tensor so that a tensor no rank gave a
    gradient keeps none (an optimizer skips it, as it would in one process)."""
    if not params:
        return
    dtype = functools.reduce(torch.promote_types, (p.dtype for p in params))
    flags = torch.tensor([float(p.grad is not None) for p in params], device=_device(params), dtype=dtype)
    flat = torch.cat([flags, *[(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) * weight for p in params]])
    dist.all_reduce(flat)
    offset = len(params)
    for i, p in enumerate(params):
        part = flat[offset: offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
        if flat[i] > 0:
            p.grad = part.clone() if p.grad is None else p.grad.copy_(part)


def _sum_sparse(p: torch.Tensor, weight: float, group: Group) -> None:
    """A sparse (row) gradient summed over ranks: every rank's rows, weighted, gathered and coalesced."""
    width = p.shape[1:]
    if p.grad is None:
        indices, values = torch.zeros(1, 0, dtype=torch.long, device=p.device), torch.zeros(0, *width, device=p.device, dtype=p.dtype)
    else:
        grad = p.grad.coalesce()
        indices, values = grad.indices(), grad.values() * weight
    counts = [int(c.item()) for c in gather_states(torch.tensor([indices.shape[1]], device=p.device), group)]
    if not any(counts):
        return
    rows = torch.cat(gather_rows(indices[0], counts, group))
    p.grad = torch.sparse_coo_tensor(rows[None], torch.cat(gather_rows(values, counts, group)), p.shape).coalesce()


def _average(optimizer: torch.optim.Optimizer, weight: float, group: Group) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if isinstance(optimizer, torch.optim.SparseAdam):
        for p in params:
            _sum_sparse(p, weight, group)
    else:
        _average_dense(params, weight)


class GradientAverager:
    """Averages gradients across ranks at every `step` of the given optimizers (a step pre-hook),
    each rank's weighted by `weight`, its share of the current minibatch."""

    active: GradientAverager | None = None

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer], group: Group) -> None:
        self.group, self.weight = group, 1.0 / group.size
        self.done: set[int] = set()  # optimizers averaged ahead of their step (`average_now`)
        self.handles = [optimizer.register_step_pre_hook(self._hook) for optimizer in optimizers]

    def _hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if id(optimizer) in self.done:
            self.done.discard(id(optimizer))
        else:
            _average(optimizer, self.weight, self.group)

    def average(self, optimizer: torch.optim.Optimizer) -> None:
        _average(optimizer, self.weight, self.group)
        self.done.add(id(optimizer))

    @contextmanager
    def installed(self) -> Iterator[GradientAverager]:
        GradientAverager.active = self
        try:
            yield self
        finally:
            GradientAverager.active = None
            for handle in self.handles:
                handle.remove()


def average_now(optimizer: torch.optim.Optimizer) -> None:
    """Average `optimizer`'s gradients across ranks now, not at its step: for code that reads
    the averaged gradient first (clipping its norm). Nothing happens in a single process."""
    if GradientAverager.active is not None:
        GradientAverager.active.average(optimizer)
