"""The memory a run needs, checked before its modules are allocated.

Linux overcommits: an allocation far beyond RAM can succeed and the process is killed later,
or the machine swaps for an hour. So a built-in model is first constructed on torch's "meta"
device, which allocates nothing, and its parameter count bounds the run's memory from below:
every parameter is held at least twice in training, as its value and its gradient (the guide,
the optimizer's state and the activations come on top). A run whose lower bound exceeds the
memory available is refused before anything is allocated; once model, guide and method are
built (a user's program is only checked then), all their parameters are checked again. While
they are built on the CPU, `capped` limits the address space to what is available, so that an
allocation the bound did not foresee (a guide larger than the model) fails with the
allocator's error, which the command line reports in one line, instead of being killed.
"""

from __future__ import annotations

import resource
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from pyrovae.errors import PyrovaeError

BYTES_PER_PARAMETER = 2 * 4  # a float32 value and its gradient


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation could take on `device`: free GPU memory, or Linux's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return proc_bytes("/proc/meminfo", "MemAvailable")


def proc_bytes(path: str, field: str) -> int | None:
    """A Linux /proc file's `field` (given there in kB) in bytes; None where there is none."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def meta_parameters(construct: Callable[[], nn.Module]) -> int | None:
    """The parameter count of the module `construct` builds, built without allocating it."""
    try:
        with torch.device("meta"):
            module = construct()
    except Exception:  # noqa: BLE001 - a module that cannot be built on "meta" is built for real, unchecked
        return None
    return sum(p.numel() for p in module.parameters()) if isinstance(module, nn.Module) else None


def check_fits(parameters: int | None, device: torch.device, held: int = 0, available: int | None = None) -> None:
    """Refuse a run whose `parameters` and their gradients cannot fit in memory on `device`; `held`:
    the bytes those already allocated take (they count as available to themselves)."""
    available = available_bytes(device) if available is None else available
    if parameters is None or available is None:
        return
    needed = parameters * BYTES_PER_PARAMETER
    if needed > available + held:
        raise PyrovaeError(
            f"this run needs more than {needed / 2**30:.1f} GiB ({parameters:,} parameters and their gradients) "
            f"but {(available + held) / 2**30:.1f} GiB is available on {device.type}: choose a smaller --latent, --hidden or --layers"
        )


@contextmanager
def capped(device: torch.device) -> Iterator[None]:
    """On a Linux CPU, let this process's address space grow by at most the memory available."""
    available, used = (available_bytes(device), proc_bytes("/proc/self/status", "VmSize")) if device.type == "cpu" else (None, None)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = None if available is None or used is None else used + available
    if limit is None or (soft != resource.RLIM_INFINITY and soft <= limit) or (hard != resource.RLIM_INFINITY and hard < limit):
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
