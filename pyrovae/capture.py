"""Capture a loss's tensor program once and replay it without Pyro, checked against the program.

A Pyro objective spends most of a small minibatch step interpreting the program: the
messenger stack, trace dictionaries, distribution objects and their argument checks. For a
program whose structure is static (the same sites, shapes and plates every step, the case for
every model pyrovae ships), the tensor operations are the same each step, so we record them
once with `torch.fx`'s `make_fx` (ATen operations, random draws included, parameters and
buffers as inputs); a program with in-place operations is recorded functionalized
(`torch.func.functionalize`: they become new tensors, and a buffer the program updates, such
as batch norm's running statistics, is written back at the end). Then we simplify the graph
(`pyrovae.simplify`) and from then on call it. Pyro's `JitTrace_ELBO` did this with TorchScript, which torch deprecates; `torch.compile`
needs a C++ toolchain and tens of seconds per shape. A capture takes a fraction of a second.

A graph is used only where it gives the program's numbers:

- **Keyed on what it baked in.** Each graph belongs to the shapes, dtypes and devices of its
  inputs, the grad mode, the static arguments, and the state of the program's modules: the
  identity, shape, dtype, device and `requires_grad` of every parameter and buffer, every
  module's train/eval mode and every attribute of a plain type (numbers, strings, booleans,
  tuples of them; a temperature, a step counter). A change captures anew.
- **Checked against the program** when it is captured and again at its calls 10, 100, 1000
  and every 1000th after: the program runs first, from the same random and module state,
  which are then put back, and the graph takes the step (so a resumed run takes exactly the
  steps of an uninterrupted one). The two must agree in value, in the gradient of every
  trained tensor, in the buffers they leave and in the random numbers they draw (torch's,
  Python's and NumPy's generators), and the program must leave its modules' plain attributes
  as it found them. A mismatch drops the graph for good: the state is put back, the program
  takes the step, runs eagerly from then on and says why. A check costs one eager step.
- **Refused** where the program cannot be replayed: control flow on tensor values, Pyro's
  param store (`pyro.param`), an in-place change of a parameter or of the data, Pyro handlers
  around the call, an operation the tracer rejects. `refused` holds the reason and it is
  logged once (logger ``"pyrovae"``).

What a graph cannot see, and the checks catch only when it changes on a checked call: tensors
the program reads that are neither a parameter nor a buffer of its modules (a plain tensor
attribute, a global, a closure), and Python state outside the modules (globals, attributes
of non-module objects, contents of lists and dicts). Register such tensors as buffers, keep
such state in plain attributes of the modules, or train with `--eager`.

References:
    Kingma & Welling (2019), Algorithm 1 (the step being sped up).
"""

from __future__ import annotations

import contextlib
import logging
import random
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

from pyrovae.simplify import simplify

__all__ = ["CapturedLoss", "check_due", "leaves_no_trace", "same_randomness", "simplify"]

logger = logging.getLogger("pyrovae")
aten = torch.ops.aten
_PLAIN = (bool, int, float, str, type(None))
# nn.Module's own bookkeeping, not state a program reads (parameters, buffers and submodules are read apart)
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def check_due(calls: int) -> bool:
    """Whether a graph's `calls`-th use is checked against the program: 1, 10, 100, 1000, 2000, ..."""
    return calls in (1, 10, 100) or calls % 1000 == 0


@dataclass
class _Graph:
    module: fx.GraphModule
    tensors: list[torch.Tensor]  # the parameters and buffers it reads, in order (held: their ids key it)
    calls: int = 0


class CapturedLoss:
    """`loss(x, index, *static)` of `modules`' program, replayed from captured graphs.

    Calls capture a graph for each new key (see the module docstring) and replay it after;
    `refused` says, per key, why the program runs eagerly instead. The loss may be a tensor
    of any shape (evaluation captures per-sample log-weights).

    Args:
        loss: the eager loss; reads its networks' tensors from `modules`.
        modules: every module whose parameters and buffers the loss reads.
        max_graphs: graphs kept at once (the least recently used goes first).
    """

    def __init__(self, loss: Callable[..., torch.Tensor], modules: nn.Module, max_graphs: int = 16) -> None:
        self.loss = loss
        self.program = _Program(loss, modules)
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.refused: dict[tuple, str] = {}
        self.max_graphs = max_graphs
        self.checks = 0  # checks run against the program, captures included
        self.captures = 0
        self.eager: str | None = None  # why every call runs the program: a refusal holds for the program
        self._logged: set[str] = set()
        self._fingerprint = _Fingerprint(self.program)

    def __call__(self, x: torch.Tensor, index: torch.Tensor, *static: Any) -> torch.Tensor:
        if self.eager is not None:
            return self.loss(x, index, *static)
        if _PYRO_STACK:  # a handler around the call would act on the program, not on a graph
            self._log("Pyro handlers are active around the call")
            return self.loss(x, index, *static)
        key = (x.shape, x.dtype, x.device, index.shape, index.dtype, torch.is_grad_enabled(), static, self._fingerprint())
        if key not in self.graphs:
            return self._capture(key, x, index, static)
        self.graphs.move_to_end(key)
        entry = self.graphs[key]
        entry.calls += 1
        if check_due(entry.calls):
            return self._checked(key, entry, x, index, static)
        return entry.module(entry.tensors, x, index)

    def _keep(self, key: tuple, entry: _Graph) -> None:
        self.graphs[key] = entry
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)

    def _refuse(self, key: tuple, reason: str) -> None:
        """From now on the program runs eagerly: what made one graph wrong is the program's."""
        self.refused[key] = self.eager = reason
        self.graphs.clear()
        self._log(reason)

    def _log(self, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            logger.warning("pyrovae: the program runs eagerly (no captured graph): %s", reason)

    def _capture(self, key: tuple, x: torch.Tensor, index: torch.Tensor, static: tuple) -> torch.Tensor:
        """Capture a graph for `key` and check it; this call's loss is the program's own."""
        self.captures += 1
        if self.captures > 4 * self.max_graphs:
            self._refuse(key, f"the key changed {self.captures - 1} times (the modules' state changes from call to call)")
            return self.loss(x, index, *static)
        named = [*self.program.named_parameters(remove_duplicate=False), *self.program.named_buffers(remove_duplicate=False)]
        unique = {id(t): t for _, t in named}  # a tensor shared by two modules is one input
        position = {key: i for i, key in enumerate(unique)}
        tensors, names = list(unique.values()), {n: position[id(t)] for n, t in named}
        try:
            graph = self.trace(names, tensors, x, index, static)
        except _Refused as reason:
            self._refuse(key, str(reason))
            return self.loss(x, index, *static)
        entry = _Graph(graph, tensors, calls=1)
        self._keep(key, entry)
        return self._checked(key, entry, x, index, static)

    def trace(self, names: dict[str, int], tensors: list[torch.Tensor], x: torch.Tensor, index: torch.Tensor, static: tuple) -> fx.GraphModule:
        """The functionalized, simplified graph of one call, traced on copies of the tensors with
        the random and module state put back afterwards. `names` gives each parameter's and
        buffer's name, shared ones included, its position in `tensors`."""
        def program(tensors: list[torch.Tensor], x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            swapped = {name: tensors[i] for name, i in names.items()}
            return torch.func.functional_call(self.program, swapped, (x, index, *static), tie_weights=False)

        graph, params = self._record(program, tensors, x, index, functional=False)
        if _mutations(graph):  # in-place operations: record the program's functional form instead
            graph, params = self._record(program, tensors, x, index, functional=True)
            _check_mutations(graph, [t.requires_grad for t in tensors])
        if params.names:
            raise _Refused(f"the program reads Pyro's param store ({', '.join(sorted(params.names)[:3])}, ...): pyro.param/pyro.module values live outside its modules")
        if any(torch.is_tensor(v) and v.requires_grad for v in _constants(graph)):
            raise _Refused("the program reads a tensor that needs a gradient but is not a parameter of its modules")
        try:
            simplify(graph)
        except Exception as error:  # a rewrite met a form it does not know: the graph is not used
            raise _Refused(f"simplifying the graph failed: {_first_line(error)}") from error
        return graph

    def _record(self, program: Callable, tensors: list[torch.Tensor], x: torch.Tensor, index: torch.Tensor, functional: bool) -> tuple[fx.GraphModule, _ParamSites]:
        """`program`'s ATen graph, recorded on copies of the tensors, functionalized if asked
        (`torch.func.functionalize` also decomposes some fused kernels, such as
        binary_cross_entropy_with_logits: programs without in-place operations keep them)."""
        copies = [t.detach().clone() for t in tensors]
        state = _ModuleState(self.program)
        try:
            with same_randomness(x.device), _pyro_elbos_traceable(), pyro.validation_enabled(False), \
                    warnings.catch_warnings(), _ParamSites() as params:
                warnings.simplefilter("ignore")
                graph = make_fx(torch.func.functionalize(program, remove="mutations") if functional else program)(copies, x, index)
        except Exception as error:  # the tracer met something it cannot record
            raise _Refused(f"the tracer stopped: {_first_line(error)}") from error
        finally:
            state.restore()
        return graph, params

    def _checked(self, key: tuple, entry: _Graph, x: torch.Tensor, index: torch.Tensor, static: tuple) -> torch.Tensor:
        """The graph's loss for this call, after the program has run from the same random and
        module state (put back afterwards) and agreed with it; on a mismatch the graph is
        dropped and the call is the program's own."""
        self.checks += 1
        trained = [t for t in entry.tensors if t.requires_grad] if torch.is_grad_enabled() else []
        state, before = _ModuleState(self.program), _RandomState(x.device)
        with same_randomness(x.device):
            loss = self.loss(x, index, *static)
            grads = _grads(loss, trained, retain=False)
            drawn = _RandomState(x.device)
        buffers, error = state.buffers_now(), state.changed_attribute()
        state.restore()
        try:
            graph_loss = entry.module(entry.tensors, x, index)
            error = error or _difference(loss, grads, graph_loss, _grads(graph_loss, trained, retain=True))
        except Exception as failure:  # the program ran: the graph is at fault
            error = f"the graph failed: {_first_line(failure)}"
        if error is None and not drawn.same_as(_RandomState(x.device)):
            error = "the graph draws other random numbers than the program (it may use NumPy's or Python's generators)"
        if error is None and not all(_close(a, b) for a, b in zip(buffers, state.buffers_now())):
            error = "the graph leaves other buffer values than the program"
        if error is None:
            return graph_loss
        self._refuse(key, error if entry.calls == 1 else f"{error} (at the graph's call {entry.calls})")
        state.restore(), before.restore()
        return self.loss(x, index, *static)


class _Refused(Exception):
    """Why a program cannot be replayed from a graph."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _grads(loss: torch.Tensor, tensors: list[torch.Tensor], retain: bool) -> list[torch.Tensor]:
    if not tensors or not loss.requires_grad:
        return [torch.zeros_like(t) for t in tensors]
    grads = torch.autograd.grad(loss.sum(), tensors, allow_unused=True, retain_graph=retain)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not (a.dtype.is_floating_point or a.dtype.is_complex):
        return bool(torch.equal(a, b))
    return bool(torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))


def _difference(loss: torch.Tensor, grads: list[torch.Tensor], graph_loss: Any, graph_grads: list[torch.Tensor]) -> str | None:
    """How the graph's loss or gradients differ from the program's (None: they agree)."""
    if not torch.is_tensor(graph_loss) or not _close(loss.detach(), graph_loss.detach(), atol=1e-4):
        shown = graph_loss.detach().sum().item() if torch.is_tensor(graph_loss) else graph_loss
        return f"the graph's loss {shown:.6g} differs from the program's {loss.detach().sum().item():.6g}"
    if not all(_close(a, b, rtol=1e-3) for a, b in zip(grads, graph_grads)):
        return "the graph's gradients differ from the program's"
    return None


_ALLOCATIONS = (aten.empty.memory_format, aten.empty_like.default, aten.new_empty.default, aten.empty_strided.default)


def _mutations(graph: fx.GraphModule) -> list[fx.Node]:
    """The in-place operations of a recorded graph, except a random draw into a fresh allocation
    that nothing else reads (how `torch.randn` and Pyro's `rsample` record: `normal_(empty(...))`)."""
    found = []
    for node in graph.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) or not node.target._schema.is_mutable:
            continue
        fresh = node.args[0] if node.args else None
        draw = torch.Tag.nondeterministic_seeded in node.target.tags and isinstance(fresh, fx.Node) \
            and fresh.target in _ALLOCATIONS and len(fresh.users) == 1
        if not draw:
            found.append(node)
    return found


def _check_mutations(graph: fx.GraphModule, requires_grad: list[bool]) -> None:
    """After functionalization only buffers may be written, by a `copy_` into the input."""
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    written = {n: i for i, n in enumerate(placeholders)}
    for node in graph.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) or not node.target._schema.is_mutable:
            continue
        target = node.args[0] if node.args else None
        if node.target is not aten.copy_.default or target not in written:
            raise _Refused(f"the program mutates a tensor in a way the graph cannot replay ({node.target})")
        i = written[target]
        if i >= len(requires_grad):
            raise _Refused("the program changes its data in place")
        if requires_grad[i]:
            raise _Refused("the program changes a parameter in place")


class _Fingerprint:
    """What a graph bakes in of the modules, read every call: each module's mode and plain
    attributes, and the identity, shape, dtype, device and `requires_grad` of its tensors. The
    module tree is walked again only when a module gains or loses an attribute or a child."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._walk()

    def _walk(self) -> None:
        self.entries = []
        for module in self.root.modules():
            state = module.__dict__
            own = tuple(sorted(state.keys() - _MODULE_INTERNALS))
            self.entries.append((state, len(state), own, tuple(map(id, state["_modules"].values()))))

    def _changed(self) -> bool:
        return any(len(state) != size or (children and tuple(map(id, state["_modules"].values())) != children)
                   for state, size, _, children in self.entries)

    def __call__(self) -> tuple:
        if self._changed():
            self._walk()
        parts: list[Any] = []
        for state, _, own, _ in self.entries:
            parts.append(state["training"])
            for tensors in (state["_parameters"].values(), state["_buffers"].values()):
                parts.extend((id(t), t.shape, t.dtype, t.device, t.requires_grad) for t in tensors if t is not None)
            if own:
                parts.extend(_plain(state[name]) for name in own)
        return tuple(parts)


_UNSEEN = object()


def _plain(value: Any) -> Any:
    """`value` as a hashable key if it is of a plain type (or a tuple/list of those), else _UNSEEN."""
    if isinstance(value, _PLAIN):
        return (type(value), value)
    if isinstance(value, (tuple, list)) and len(value) <= 64:
        items = tuple(_plain(v) for v in value)
        return _UNSEEN if any(i is _UNSEEN for i in items) else (type(value), items)
    return _UNSEEN


class _ModuleState:
    """The modules' tensors, buffer values and plain attributes now, to put back after a run
    that must leave no trace."""

    def __init__(self, program: nn.Module) -> None:
        self.buffers = [b for b in program.buffers()]
        self.saved = [b.detach().clone() for b in self.buffers]
        self.modules = list(program.modules())
        self.attributes = [self._attributes(m) for m in self.modules]
        self.tensors = [(dict(m._parameters), dict(m._buffers)) for m in self.modules]  # which tensor each module holds
        self.children = [set(m._modules) for m in self.modules]

    @staticmethod
    def _attributes(module: nn.Module) -> dict[str, Any]:
        return {k: v for k, v in module.__dict__.items() if k not in _MODULE_INTERNALS and _plain(v) is not _UNSEEN}

    def buffers_now(self) -> list[torch.Tensor]:
        return [b.detach().clone() for b in self.buffers]

    def built(self, i: int) -> bool:
        """Whether module i gained parameters or submodules in the run: a module that builds
        itself on its first call (Pyro's autoguides) keeps what it built, and the attributes
        that say so (an autoguide's prototype trace)."""
        module, (parameters, _) = self.modules[i], self.tensors[i]
        return bool(set(module._parameters) - set(parameters) or set(module._modules) - self.children[i])

    def restore(self) -> None:
        built = [self.built(i) for i in range(len(self.modules))]
        for module, (parameters, buffers) in zip(self.modules, self.tensors):
            module._parameters.update(parameters), module._buffers.update(buffers)
        with torch.no_grad():
            for buffer, saved in zip(self.buffers, self.saved):
                buffer.copy_(saved)
        for module, attributes, new in zip(self.modules, self.attributes, built):
            if new:
                continue
            for name in [k for k in self._attributes(module) if k not in attributes]:
                delattr(module, name)
            module.__dict__.update(attributes)

    def changed_attribute(self) -> str | None:
        """Which plain attribute the program changed since this state was taken (None: none)."""
        for module, attributes in zip(self.modules, self.attributes):
            now = self._attributes(module)
            for name in sorted(set(now) | set(attributes)):
                if _plain(now.get(name, _UNSEEN)) != _plain(attributes.get(name, _UNSEEN)):
                    return f"the program changes {type(module).__name__}.{name} when it runs, which a graph cannot repeat"
        return None


class _RandomState:
    """The generators a program may draw from: torch's (CPU, and the device's), Python's, NumPy's."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.torch = torch.get_rng_state()
        self.device = torch.cuda.get_rng_state(device) if self.cuda else None
        self.device_index = device
        self.python = random.getstate()
        self.numpy = np.random.get_state()

    def restore(self) -> None:
        torch.set_rng_state(self.torch)
        if self.cuda:
            torch.cuda.set_rng_state(self.device, self.device_index)
        random.setstate(self.python)
        np.random.set_state(self.numpy)

    def same_as(self, other: _RandomState) -> bool:
        return (torch.equal(self.torch, other.torch) and (not self.cuda or torch.equal(self.device, other.device))
                and self.python == other.python and self.numpy[2:] == other.numpy[2:]
                and bool(np.array_equal(self.numpy[1], other.numpy[1])))


@contextlib.contextmanager
def same_randomness(device: torch.device | str) -> Iterator[None]:
    """Within this block draw random numbers freely: the generators (torch's CPU one and
    `device`'s, Python's and NumPy's) are put back as they were when it ends."""
    state = _RandomState(device)
    try:
        yield
    finally:
        state.restore()


@contextlib.contextmanager
def leaves_no_trace(modules: nn.Module, device: torch.device | str) -> Iterator[None]:
    """Run a program for what it declares, not for its effects: the modules' buffers (batch-norm
    statistics), tensors and plain attributes (a call counter) and the random generators are
    put back as they were when the block ends."""
    state = _ModuleState(modules)
    try:
        with same_randomness(device):
            yield
    finally:
        state.restore()


class _ParamSites(Messenger):
    """Notes the names of the `pyro.param` sites (pyro.module registers through them) it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "param":
            self.names.add(msg["name"])


class _Program(nn.Module):
    """Holds the modules so that `functional_call` can swap all their tensors at once."""

    def __init__(self, loss: Callable[..., torch.Tensor], modules: nn.Module) -> None:
        super().__init__()
        self.modules_ = modules
        self._loss = loss

    def forward(self, x: torch.Tensor, index: torch.Tensor, *static: Any) -> torch.Tensor:
        return self._loss(x, index, *static)


@contextlib.contextmanager
def _pyro_elbos_traceable() -> Iterator[None]:
    """Pyro's Trace_ELBO and TraceMeanField_ELBO call `.item()` (to build the surrogate loss) and
    test the loss for NaN: neither can be recorded. Within this block `.item()` becomes
    `.detach()` (same value, same gradient) and the NaN warning is skipped (training checks the
    loss every step)."""
    import pyro.infer.trace_elbo as trace_elbo
    import pyro.infer.trace_mean_field_elbo as mean_field

    def detach(value: Any) -> Any:
        return value.detach() if torch.is_tensor(value) else value

    saved = [(m, m.torch_item, m.warn_if_nan) for m in (trace_elbo, mean_field)]
    try:
        for module, _, _ in saved:
            module.torch_item, module.warn_if_nan = detach, lambda *a, **k: None
        yield
    finally:
        for module, item, warn in saved:
            module.torch_item, module.warn_if_nan = item, warn


def _constants(graph: fx.GraphModule) -> list[Any]:
    return [getattr(graph, n.target) for n in graph.graph.nodes if n.op == "get_attr"]
