"""Where a Pyro program keeps its parameters: its modules and Pyro's param store.

A model or guide may be a function, a bound method, an `nn.Module` or a `PyroModule`. Its
parameters are those of the modules it is (or its owner holds), and the entries of Pyro's
param store that it reads (`pyro.param`, `pyro.module`). `ProgramParameters` finds both from
one trace, and then proves the list complete from the loss's autograd graph: a tensor that
takes a gradient but lives in neither place could be neither optimized nor checkpointed, so
it is refused rather than left untrained.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, TypeVar

import pyro
import torch
from pyro import poutine
from torch import nn

from pyrovae.batch import Batch
from pyrovae.capture import leaves_no_trace
from pyrovae.errors import PyrovaeError

__all__ = ["ProgramParameters", "check_complete", "gradient_leaves", "program_modules", "unique"]

T = TypeVar("T")


def program_modules(program: Any) -> list[nn.Module]:
    """The modules a program is, or that its owner holds: an `nn.Module`; a bound method's
    owner if it is one, else the modules among the owner's attributes; a partial's function."""
    if isinstance(program, nn.Module):
        return [program]
    if isinstance(program, functools.partial):  # also how Pyro's handlers wrap a program
        parts = [program.func, *program.args, *program.keywords.values()]
        return unique(m for part in parts if callable(part) for m in program_modules(part))
    owner = getattr(program, "__self__", None)
    if isinstance(owner, nn.Module):
        return [owner]
    if owner is not None and hasattr(owner, "__dict__"):
        return [v for v in vars(owner).values() if isinstance(v, nn.Module)]
    wrapped = getattr(program, "__wrapped__", None) or getattr(program, "fn", None)
    return program_modules(wrapped) if callable(wrapped) and wrapped is not program else []


def unique(items: Iterable[T]) -> list[T]:
    """`items` in order, each object once (by identity: tensors have no usable ==)."""
    seen: dict[int, T] = {}
    for item in items:
        seen.setdefault(id(item), item)
    return list(seen.values())


def gradient_leaves(loss: torch.Tensor) -> list[torch.Tensor]:
    """Every leaf tensor that `loss` would accumulate a gradient into."""
    leaves, stack, seen = [], [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.append(variable)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return unique(leaves)


def check_complete(loss: torch.Tensor, parameters: Iterable[torch.Tensor], optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """Refuse a loss that depends on a tensor requiring grad that is not among `parameters`, or,
    where `optimizers` are given, that none of them steps."""
    known = {id(t) for t in parameters}
    leaves = gradient_leaves(loss)
    stray = [t for t in leaves if id(t) not in known]
    stepped = {id(p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]}
    unstepped = [t for t in leaves if id(t) in known and id(t) not in stepped] if stepped else []
    if unstepped:
        shapes = ", ".join(str(tuple(t.shape)) for t in unstepped[:5])
        raise PyrovaeError(
            f"the loss depends on {len(unstepped)} parameter(s) that no optimizer of this method steps (shapes {shapes}), "
            "so they would stay untrained: a parameter created after the method was built, outside its first call"
        )
    if stray:
        shapes = ", ".join(str(tuple(t.shape)) for t in stray[:5])
        raise PyrovaeError(
            f"the loss depends on {len(stray)} tensor(s) that require grad but are in no module pyrovae can see and not in "
            f"Pyro's param store (shapes {shapes}): make the program an nn.Module, a method of one, or register them with "
            "pyro.module/pyro.param, so that they are trained and checkpointed"
        )


class ProgramParameters:
    """The parameters of model and guide: module parameters, then the param store's entries.

    Args:
        programs: the model and guide (and any other program the method runs).
    """

    def __init__(self, *programs: Any) -> None:
        self.programs = tuple(p for p in programs if p is not None)  # local VI, MCMC-EM need no guide
        self.modules = nn.ModuleList(unique(m for p in programs for m in program_modules(p)))
        self.named: dict[str, torch.Tensor] = {}  # parameters read through Pyro's param store, in first-use order
        self.trace: Any = None  # the last program's trace from `discover`
        self.initial = {id(p) for p in self.modules.parameters()}  # what the method's optimizers are built with

    def _state_module(self) -> nn.Module:
        """The program itself when it is a module (its own state_dict keys), else its modules."""
        if len(self.programs) == 1 and isinstance(self.programs[0], nn.Module):
            return self.programs[0]
        return self.modules

    def module_state(self) -> dict[str, Any]:
        return self._state_module().state_dict()

    def load_module_state(self, state: dict[str, Any]) -> None:
        self._state_module().load_state_dict(state)

    def module_parameters(self) -> list[torch.Tensor]:
        return [p for p in unique(self.modules.parameters()) if p.requires_grad]

    def discover(self, batch: Batch, **extra: Any) -> list[torch.Tensor]:
        """Trace every program once on `batch` and return the parameters the optimizers were not
        given at construction: those read outside the modules held here (a `pyro.param`'s
        unconstrained tensor in the store, what Pyro optimizes; for `pyro.module` the module's
        own parameter, what its forward uses, not a stale store entry of the same name), and
        those the held modules created since (on their first call, in this trace or before)."""
        found: dict[str, torch.Tensor | None] = {}
        with torch.no_grad(), leaves_no_trace(self.modules, batch.device):  # a run is the same, prepared or resumed
            for program in self.programs:
                for _, part in batch.groups():  # the last trace kept: the unlabelled call's, where there is one
                    trace = self.trace = part.call(poutine.trace(program).get_trace, **extra)
                    for name, site in trace.nodes.items():
                        if site["type"] == "param" and name not in found:
                            found[name] = _param_tensor(name, site)
        held = {id(p) for p in self.modules.parameters()}
        self.named = {n: t for n, t in found.items() if t is not None and t.requires_grad and id(t) not in held}
        # a module that builds its parameters on its first call (Pyro's autoguides) had none when
        # the optimizers were made: they are module state, but the optimizers must be given them
        created = [p for p in self.modules.parameters() if id(p) not in self.initial and p.requires_grad]
        return unique([*created, *self.store_tensors()])

    def store_tensors(self) -> list[torch.Tensor]:
        return list(unique(self.named.values()))

    @property
    def store_names(self) -> list[str]:
        return list(self.named)

    def all(self) -> list[torch.Tensor]:
        return unique([*self.module_parameters(), *self.store_tensors()])

    def store_state(self) -> dict[str, torch.Tensor]:
        """The unconstrained values of the store entries, for a checkpoint."""
        return {n: t.detach().clone() for n, t in self.named.items()}

    def load_store_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a checkpoint's store values into the (already discovered) entries, in place."""
        if sorted(state) != sorted(self.store_names):
            raise KeyError("param_store")
        with torch.no_grad():
            for name, tensor in self.named.items():
                tensor.copy_(state[name])


def _param_tensor(name: str, site: dict) -> torch.Tensor | None:
    """The tensor a param site trains: the module's own parameter for `pyro.module`, else the
    store's unconstrained value."""
    if _MODULE_SEPARATOR in name:
        value = site["args"][1] if len(site["args"]) > 1 else None
        return value if torch.is_tensor(value) else None
    return dict(pyro.get_param_store().named_parameters()).get(name)


_MODULE_SEPARATOR = "$$$"  # how pyro.module names its parameters (pyro.params.param_store.param_with_module_name)


