"""Learning-rate schedules over epochs (``constant``; ``burda``: Burda et al. 2016, sec. 5), applied to every optimizer a method steps; no state of
their own (the rates live in the optimizers' param groups, so checkpoints carry them)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pyrovae.config import SCHEDULES

__all__ = ["BURDA_STAGES", "SCHEDULES", "apply_schedule", "burda_stage", "stage_ends"]

BURDA_STAGES = 8  # i = 0 .. 7
BURDA_EPSILON = 1e-4


def stage_ends(stages: int = BURDA_STAGES) -> list[int]:
    """The epoch each stage of Burda's schedule ends at: 1, 4, 13, 40, 121, 364, 1093, 3280."""
    ends, total = [], 0
    for i in range(stages):
        total += 3**i
        ends.append(total)
    return ends


def burda_stage(epoch: int) -> int:
    """The stage i of 0-based `epoch`; epochs after the last stage stay in it."""
    return next((i for i, end in enumerate(stage_ends()) if epoch < end), BURDA_STAGES - 1)


def lr_factor(schedule: str, epoch: int) -> float:
    """The multiple of each param group's initial rate that 0-based `epoch` trains at."""
    return 10 ** (-burda_stage(epoch) / 7) if schedule == "burda" else 1.0


def apply_schedule(optimizers: Iterable[torch.optim.Optimizer], schedule: str, epoch: int) -> None:
    """Set every param group's rate for `epoch`: its initial rate (kept in the group as
    ``initial_lr``, as torch's schedulers keep it) times the schedule's factor."""
    if schedule == "constant":
        return
    factor = lr_factor(schedule, epoch)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
            if schedule == "burda" and "eps" in group:
                group["eps"] = BURDA_EPSILON
