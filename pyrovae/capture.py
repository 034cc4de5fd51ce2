"""Capture a training loss's tensor program once per input shape and replay it without Pyro.

A Pyro objective spends most of a small minibatch step interpreting the program: the
messenger stack, trace dictionaries, distribution objects and their argument checks. For a
program whose structure is static (the same sites, shapes and plates every step, the case
for every model pyrovae ships), the tensor operations it performs are the same each step, so
we record them once with `torch.fx`'s `make_fx` (ATen operations, random draws included, with
the parameters as inputs), clean the graph up (constant folding, no-op and duplicate removal)
and from then on call the graph. Gradients flow through the replayed ATen operations as usual.

Pyro's `JitTrace_ELBO` did this with TorchScript, which torch deprecates; `torch.compile`
needs a C++ toolchain and tens of seconds per shape. A capture takes a fraction of a second.

Every capture is checked before use: the graph and the program, run from the same random
state, must give the same loss and the same gradients. A program that cannot be captured
(data-dependent control flow, parameters in Pyro's param store, a Pyro feature the tracer
rejects) keeps running eagerly. What the graph cannot see: a plain tensor attribute (neither a
parameter nor a buffer) that the program reads is recorded as a constant, so changing it
between steps goes unnoticed; register such tensors as buffers, or train with `--eager`.

References:
    Kingma & Welling (2019), Algorithm 1 (the step being sped up).
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from typing import Any, Callable, Iterator

import pyro
import torch
from pyro.poutine.messenger import Messenger
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

__all__ = ["CapturedLoss", "same_randomness", "simplify"]

aten = torch.ops.aten
_NO_OP_VALUES = {aten.add.Tensor: 0, aten.sub.Tensor: 0, aten.mul.Tensor: 1, aten.div.Tensor: 1}
_SHAPE_OPS = {aten.view.default, aten.expand.default, aten._unsafe_view.default, aten.reshape.default}


class CapturedLoss:
    """`loss(x, index, *static)` of `modules`' program, captured per (shape, dtype, device) of its
    tensor inputs and per value of the `static` arguments (numbers the program's structure depends
    on, such as a sample count).

    Calls with inputs of a new signature capture a graph first; `refused` says, per signature,
    why a program runs eagerly instead. The loss may also be a tensor of any shape (evaluation
    captures per-sample log-weights).

    Args:
        loss: the eager loss; reads its networks' tensors from `modules`.
        modules: every module whose parameters and buffers the loss reads.
    """

    def __init__(self, loss: Callable[..., torch.Tensor], modules: nn.Module) -> None:
        self.loss = loss
        self.program = _Program(loss, modules)
        self.graphs: dict[tuple, fx.GraphModule | None] = {}
        self.refused: dict[tuple, str] = {}
        self._tensors: list[torch.Tensor] | None = None

    def tensors(self) -> list[torch.Tensor]:
        """The graph's inputs: every parameter, then every buffer (read once; modules keep them)."""
        if self._tensors is None:
            self._tensors = [*self.program.parameters(), *self.program.buffers()]
        return self._tensors

    def __call__(self, x: torch.Tensor, index: torch.Tensor, *static: Any) -> torch.Tensor:
        key = (x.shape, x.dtype, x.device, index.shape, torch.is_grad_enabled(), static)
        if key not in self.graphs:
            try:
                self.graphs[key] = self.capture(x, index, *static)
            except _Refused as reason:
                self.graphs[key], self.refused[key] = None, str(reason)
        graph = self.graphs[key]
        return self.loss(x, index, *static) if graph is None else graph(self.tensors(), x, index)

    def capture(self, x: torch.Tensor, index: torch.Tensor, *static: Any) -> fx.GraphModule:
        """The cleaned-up graph of one call, checked against the program (value and gradients)."""
        names = [n for n, _ in self.program.named_parameters()] + [n for n, _ in self.program.named_buffers()]

        def program(tensors: list[torch.Tensor], x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.program, dict(zip(names, tensors)), (x, index, *static), tie_weights=True)

        try:  # tracing draws random numbers: the run must not see that
            with same_randomness(x.device), _pyro_elbos_traceable(), pyro.validation_enabled(False), warnings.catch_warnings(), _ParamSites() as params:
                warnings.simplefilter("ignore")
                graph = make_fx(program)([t.detach() for t in self.tensors()], x, index)
        except Exception as error:  # the tracer met something it cannot record
            raise _Refused(f"the tracer stopped: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from error
        if params.names:
            raise _Refused(f"the program reads Pyro's param store ({', '.join(sorted(params.names)[:3])}, ...): pyro.param/pyro.module values live outside its modules")
        if any(torch.is_tensor(v) and v.requires_grad for v in _constants(graph)):
            raise _Refused("the program reads a parameter its modules do not hold")
        simplify(graph)
        self.check(graph, x, index, *static)
        return graph

    def check(self, graph: fx.GraphModule, x: torch.Tensor, index: torch.Tensor, *static: Any) -> None:
        """The graph and the program, from the same random state, give the same loss and gradients."""
        trained = [t for t in self.tensors() if t.requires_grad] if torch.is_grad_enabled() else []
        results = []
        for run in (lambda: self.loss(x, index, *static), lambda: graph(self.tensors(), x, index)):
            with same_randomness(x.device):
                try:
                    loss = run()
                except Exception as error:  # the program ran eagerly before: the graph is at fault
                    raise _Refused(f"the graph failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from error
                grads = torch.autograd.grad(loss, trained, allow_unused=True) if loss.requires_grad else ()
            results.append((loss.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(trained, grads)]))
        (loss, grads), (graph_loss, graph_grads) = results
        if loss.shape != graph_loss.shape or not torch.allclose(loss, graph_loss, rtol=1e-4, atol=1e-4):
            raise _Refused(f"the graph's loss {graph_loss.sum().item():.6g} differs from the program's {loss.sum().item():.6g}")
        if not all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(grads, graph_grads)):
            raise _Refused("the graph's gradients differ from the program's")


class _ParamSites(Messenger):
    """Notes the names of the `pyro.param` sites (pyro.module registers through them) it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "param":
            self.names.add(msg["name"])


class _Refused(Exception):
    """Why a program cannot be replayed from a graph."""


def same_randomness(device: torch.device) -> contextlib.AbstractContextManager:
    """Within this block draw random numbers freely: the generators (CPU, and `device`'s if a GPU)
    are put back as they were when it ends."""
    cuda = torch.device(device).type == "cuda"
    return torch.random.fork_rng(devices=[torch.device(device)] if cuda else [], device_type="cuda")


class _Program(nn.Module):
    """Holds the modules so that `functional_call` can swap all their tensors at once."""

    def __init__(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], modules: nn.Module) -> None:
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


def _shape(node: Any) -> torch.Size | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.shape if torch.is_tensor(value) else None


def simplify(graph: fx.GraphModule) -> None:
    """Fold constants, drop no-ops, duplicates and Pyro's surrogate-loss bookkeeping, fuse linear
    layers and remove dead code (in place). Each rewrite keeps the value and the gradient."""
    g = graph.graph
    constant: set[fx.Node] = {n for n in g.nodes if n.op == "get_attr"}
    seen: dict[tuple, fx.Node] = {}
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        same = _no_op_input(graph, node, constant)
        if same is not None:
            node.replace_all_uses_with(same)
            g.erase_node(node)
            continue
        if not _pure(node.target):
            continue
        if node.target is not operator.getitem and all(n in constant for n in node.all_input_nodes):
            folded = _fold(graph, node)
            if folded is not None:
                constant.add(folded)
                continue
        key = (node.target, _hashable(node.args), _hashable(node.kwargs))
        if key in seen:  # a common subexpression
            node.replace_all_uses_with(seen[key])
            g.erase_node(node)
            continue
        seen[key] = node
    _drop_surrogate(g)
    _standardized_draws(g)
    for _ in range(8):  # each rewrite can make room for another: repeat until none applies
        before = str(g)
        _constants_after_sum(g)
        _factors_after_sum(graph)
        _common_factors(graph)
        _merge_factors(graph)
        _nested_sums(g)
        _constants_outward(g)
        g.eliminate_dead_code()
        if str(g) == before:
            break
    _fuse_randn(g)
    _fuse_linear(g)
    g.eliminate_dead_code()
    _public_callables(g)
    graph.recompile()


def _no_op_input(graph: fx.GraphModule, node: fx.Node, constant: set[fx.Node]) -> fx.Node | None:
    """The input that `node` returns unchanged (same shape and dtype), if it is a no-op."""
    target, args = node.target, node.args
    if not args or not isinstance(args[0], fx.Node) or _shape(args[0]) != _shape(node):
        return None
    first = args[0]
    if target is aten.lift_fresh_copy.default or target in _SHAPE_OPS:
        return first  # a copy of a constant made every call, a reshape to the same shape
    if target not in _NO_OP_VALUES or len(args) != 2 or first.meta["val"].dtype != node.meta["val"].dtype:
        return None
    other, identity = args[1], _NO_OP_VALUES[target]
    if isinstance(other, fx.Node):  # x + zeros, x * ones, with constant tensors
        value = getattr(graph, other.target) if other in constant else None
        return first if torch.is_tensor(value) and bool((value == identity).all()) else None
    return first if other == identity else None


def _fold(graph: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """Evaluate `node`, whose inputs are all constants, once: the constant that replaces it
    (None, and the node stays, where the result is not one tensor)."""
    def value(n: fx.Node) -> Any:
        return getattr(graph, n.target)

    result = node.target(*fx.node.map_arg(node.args, value), **fx.node.map_arg(node.kwargs, value))
    if not torch.is_tensor(result):
        return None
    name = f"_folded{sum(1 for n in graph.graph.nodes if n.op == 'get_attr')}"
    graph.register_buffer(name, result)
    with graph.graph.inserting_before(node):
        new = graph.graph.get_attr(name)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.graph.erase_node(node)
    return new


def _drop_surrogate(g: fx.Graph) -> None:
    """Pyro returns `loss + (surrogate - detach(surrogate))`, where `loss` repeats the surrogate's
    arithmetic on detached terms: the same value and gradient as `surrogate` alone. Two nodes
    compute the same value when they are equal with every detach seen through."""
    ids: dict[Any, int] = {}
    key: dict[fx.Node, int] = {}
    for node in g.nodes:
        if node.op == "call_function" and node.target is aten.detach.default:
            key[node] = key[node.args[0]]
        elif node.op == "call_function" and _pure(node.target):
            shape = (node.target, _hashable(fx.node.map_arg(node.args, lambda n: ("node", key[n]))),
                     _hashable(fx.node.map_arg(node.kwargs, lambda n: ("node", key[n]))))
            key[node] = ids.setdefault(shape, len(ids))
        else:
            key[node] = ids.setdefault(("unique", id(node)), len(ids))
    for node in list(g.nodes):
        if node.op != "call_function" or node.target is not aten.add.Tensor or len(node.args) != 2:
            continue
        for loss, correction in (node.args, node.args[::-1]):
            if (isinstance(correction, fx.Node) and isinstance(loss, fx.Node) and correction.target is aten.sub.Tensor
                    and len(correction.args) == 2 and isinstance(correction.args[1], fx.Node)
                    and correction.args[1].target is aten.detach.default
                    and correction.args[1].args[0] is correction.args[0] and key[loss] == key[correction.args[0]]):
                node.replace_all_uses_with(correction.args[0])
                g.erase_node(node)
                break


def _pure(target: Any) -> bool:
    """Same inputs, same output, nothing else touched: random draws and in-place ops are not."""
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return not (target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags
                or target in (aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default))


def _standardized_draws(g: fx.Graph) -> None:
    """A Normal's log-density at its own reparameterized draw z = loc + scale * eps:
    -(z - loc)^2 / (2 scale^2) -> -eps^2 / 2, with z - loc -> scale * eps first. Equal in exact
    arithmetic, value and gradient (both are free of loc and scale); this is how a hand-written
    loss computes it, with four fewer operations per site."""
    def node(value: Any, target: Any) -> fx.Node | None:
        return value if isinstance(value, fx.Node) and value.target is target else None

    for sub in [n for n in g.nodes if n.op == "call_function" and n.target is aten.sub.Tensor and len(n.args) == 2]:
        z, loc = sub.args
        draw = node(z, aten.add.Tensor)
        if draw is not None and len(draw.args) == 2 and draw.args[0] is loc and isinstance(draw.args[1], fx.Node) \
                and _shape(draw.args[1]) == _shape(sub) and _shape(loc) == _shape(sub):
            sub.replace_all_uses_with(draw.args[1])  # (loc + scale * eps) - loc -> scale * eps
    for div in [n for n in g.nodes if n.op == "call_function" and n.target is aten.div.Tensor and len(n.args) == 2]:
        neg, twice_var = div.args
        square = node(neg.args[0], aten.pow.Tensor_Scalar) if node(neg, aten.neg.default) else None
        product = node(square.args[0], aten.mul.Tensor) if square is not None and square.args[1] == 2 else None
        doubled = node(twice_var, aten.mul.Tensor)
        var = node(doubled.args[0], aten.pow.Tensor_Scalar) if doubled is not None and doubled.args[1] == 2 else None
        if product is None or var is None or var.args[1] != 2 or _shape(div) != _shape(product):
            continue
        eps, scale = product.args
        if scale is not var.args[0]:
            eps, scale = scale, eps
        if scale is not var.args[0] or not isinstance(eps, fx.Node) or _shape(eps) != _shape(div):
            continue
        _replace(g, div, aten.mul.Tensor, (_insert(g, div, aten.pow.Tensor_Scalar, (eps, 2)), -0.5))


def _constants_after_sum(g: fx.Graph) -> None:
    """sum(x - c, dims) -> sum(x, dims) - c n, c a number, n the elements summed per output: the
    normalizing constant of a log-density is subtracted once per example, not once per element."""
    for node in list(g.nodes):
        if node.op != "call_function" or node.kwargs or not (
                (node.target is aten.sum.dim_IntList and len(node.args) == 2) or (node.target is aten.sum.default and len(node.args) == 1)):
            continue
        inner = node.args[0]
        if not (isinstance(inner, fx.Node) and inner.target is aten.sub.Tensor and len(inner.users) == 1
                and isinstance(inner.args[1], (int, float)) and _shape(inner) == _shape(inner.args[0])):
            continue
        shape = _shape(inner)
        dims = node.args[1] if len(node.args) == 2 else range(len(shape))
        count = 1
        for d in dims:
            count *= shape[d]
        total = _insert(g, node, node.target, (inner.args[0], *node.args[1:]))
        _replace(g, node, aten.sub.Tensor, (total, inner.args[1] * count))


def _factor(graph: fx.GraphModule, node: Any) -> tuple[fx.Node, float] | None:
    """(x, k) where `node` computes x * k for a number k: a product or quotient by a number or a
    0-dim constant, or a negation."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.kwargs:
        return None
    if node.target is aten.neg.default:
        return node.args[0], -1.0
    if node.target not in (aten.mul.Tensor, aten.div.Tensor) or len(node.args) != 2 or not isinstance(node.args[0], fx.Node):
        return None
    x, k = node.args
    if isinstance(k, fx.Node) and k.op == "get_attr":  # a constant tensor of one repeated number
        value = getattr(graph, k.target)
        uniform = torch.is_tensor(value) and value.dtype.is_floating_point and value.numel() > 0 and bool((value == value.flatten()[0]).all())
        k = value.flatten()[0].item() if uniform else None
    if not isinstance(k, (int, float)) or isinstance(k, bool) or k == 0 or _shape(x) != _shape(node):
        return None
    if x.meta.get("val") is None or x.meta["val"].dtype != node.meta["val"].dtype:
        return None  # a constant of another dtype promoted the product
    return x, (float(k) if node.target is aten.mul.Tensor else 1.0 / k)


def _insert(g: fx.Graph, node: fx.Node, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """A new call before `node`, with `node`'s metadata (its value's shape and dtype)."""
    with g.inserting_before(node):
        new = g.call_function(target, args, kwargs or {})
    new.meta = dict(node.meta)
    return new


def _replace(g: fx.Graph, node: fx.Node, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """`node` replaced by a call of `target`."""
    new = _insert(g, node, target, args, kwargs)
    node.replace_all_uses_with(new)
    g.erase_node(node)
    return new


def _scale(g: fx.Graph, node: fx.Node, x: fx.Node, k: float) -> None:
    """`node` replaced by x * k: x itself for k = 1, a negation for k = -1."""
    if k == 1.0 and x.meta["val"].dtype == node.meta["val"].dtype:
        node.replace_all_uses_with(x)
        g.erase_node(node)
    elif k == -1.0:
        _replace(g, node, aten.neg.default, (x,))
    else:
        _replace(g, node, aten.mul.Tensor, (x, k))


def _factors_after_sum(graph: fx.GraphModule) -> None:
    """sum(x * k) -> sum(x) * k, sum(-x) -> -sum(x): a data set's scale multiplies one number per
    example, or one in all, instead of every term (a Bernoulli log-likelihood is minus a
    cross-entropy over every pixel)."""
    g = graph.graph
    for node in list(g.nodes):
        if node.op == "call_function" and node.target in (aten.sum.dim_IntList, aten.sum.default):
            inner = node.args[0]
            factor = _factor(graph, inner)
            if factor is not None and len(inner.users) == 1 and inner.meta["val"].dtype == node.meta["val"].dtype:
                total = _insert(g, node, node.target, (factor[0], *node.args[1:]), dict(node.kwargs))
                _scale(g, node, total, factor[1])


def _common_factors(graph: fx.GraphModule) -> None:
    """x * k + y * k -> (x + y) * k (and likewise for -): the terms of a bound share its scale."""
    g = graph.graph
    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in (aten.add.Tensor, aten.sub.Tensor) or len(node.args) != 2 or node.kwargs:
            continue
        left, right = (_factor(graph, a) for a in node.args)
        if left is None or right is None or left[1] != right[1] or any(len(a.users) != 1 for a in node.args):
            continue
        if _shape(left[0]) != _shape(node) or _shape(right[0]) != _shape(node):
            continue
        _scale(g, node, _insert(g, node, node.target, (left[0], right[0])), left[1])


def _nested_sums(g: fx.Graph) -> None:
    """sum(sum(x, dims)) -> sum(x): the total of per-example totals in one reduction."""
    for node in list(g.nodes):
        if node.op == "call_function" and node.target is aten.sum.default and len(node.args) == 1 and not node.kwargs:
            inner = node.args[0]
            if isinstance(inner, fx.Node) and inner.target is aten.sum.dim_IntList and len(inner.users) == 1 and not inner.kwargs \
                    and len(inner.args) == 2 and inner.meta["val"].dtype == node.meta["val"].dtype:
                _replace(g, node, aten.sum.default, (inner.args[0],))


def _offset(node: Any) -> tuple[Any, float]:
    """(x, c) with `node` = x + c for a number c (c = 0 where `node` adds none)."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target in (aten.add.Tensor, aten.sub.Tensor) \
            and len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], (int, float)) and not isinstance(node.args[1], bool) \
            and len(node.users) == 1 and _shape(node.args[0]) == _shape(node):
        return node.args[0], float(node.args[1]) * (1 if node.target is aten.add.Tensor else -1)
    return node, 0.0


def _constants_outward(g: fx.Graph) -> None:
    """(x + a) + (y + b) -> (x + y) + (a + b), and likewise for -: a bound's normalizing constants
    meet in one number, which is dropped when they cancel."""
    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in (aten.add.Tensor, aten.sub.Tensor) or len(node.args) != 2 or node.kwargs:
            continue
        if not all(isinstance(a, fx.Node) for a in node.args):
            continue
        (x, a), (y, b) = (_offset(arg) for arg in node.args)
        if a == 0.0 and b == 0.0 or _shape(x) != _shape(node) or _shape(y) != _shape(node):
            continue
        c = a + b if node.target is aten.add.Tensor else a - b
        combined = _insert(g, node, node.target, (x, y))
        if c == 0.0:
            node.replace_all_uses_with(combined)
            g.erase_node(node)
        else:
            _replace(g, node, aten.add.Tensor, (combined, c))


def _merge_factors(graph: fx.GraphModule) -> None:
    """(x * a) * b -> x * (a b), with negations and divisions by numbers read as factors; a
    factor of 1 goes. Chains of scalings (to the data set, per example, of the loss) become one."""
    g = graph.graph
    for node in list(g.nodes):
        outer = _factor(graph, node)
        if outer is None:
            continue
        x, k = outer
        inner = _factor(graph, x)
        while inner is not None and len(x.users) == 1 and x.meta["val"].dtype == node.meta["val"].dtype:
            x, k = inner[0], k * inner[1]
            inner = _factor(graph, x)
        if x is outer[0] and not (node.target is aten.div.Tensor and k != -1.0):
            continue  # nothing merged, and nothing gained by rewriting
        _scale(g, node, x, k)


def _fuse_randn(g: fx.Graph) -> None:
    """normal_(empty(shape)) -> randn(shape): one call, the same draws from the same generator."""
    for node in list(g.nodes):
        if node.op == "call_function" and node.target is aten.normal_.default and len(node.args) == 1 and not node.kwargs:
            empty = node.args[0]
            if isinstance(empty, fx.Node) and empty.target is aten.empty.memory_format and len(empty.users) == 1:
                kwargs = {k: v for k, v in empty.kwargs.items() if k in ("dtype", "layout", "device", "pin_memory")}
                _replace(g, node, aten.randn.default, empty.args, kwargs)
                g.erase_node(empty)


def _fuse_linear(g: fx.Graph) -> None:
    """addmm(b, x, t(w)) -> linear(x, w, b): one call that decomposes in C++, not two from Python."""
    for node in list(g.nodes):
        if node.op == "call_function" and node.target is aten.addmm.default and not node.kwargs:
            bias, x, wt = node.args
            if isinstance(wt, fx.Node) and wt.target is aten.t.default:
                _replace(g, node, aten.linear.default, (x, wt.args[0], bias))


# The same ATen operations through torch's public bindings, which skip the Python frame of an
# OpOverload call (about 1 us per operation: a tenth of a small layer's time on a CPU).
_PUBLIC = {
    aten.mm.default: torch.mm, aten.addmm.default: torch.addmm, aten.linear.default: torch._C._nn.linear,
    aten.tanh.default: torch.tanh, aten.sigmoid.default: torch.sigmoid, aten.relu.default: torch.relu,
    aten.exp.default: torch.exp, aten.log.default: torch.log, aten.neg.default: torch.neg,
    aten.add.Tensor: torch.add, aten.sub.Tensor: torch.sub, aten.mul.Tensor: torch.mul, aten.div.Tensor: torch.div,
    aten.pow.Tensor_Scalar: torch.pow, aten.sum.default: torch.sum, aten.sum.dim_IntList: torch.sum,
    aten.softplus.default: torch._C._nn.softplus, aten.randn.default: torch.randn, aten.t.default: torch.t,
    aten.binary_cross_entropy_with_logits.default: torch.binary_cross_entropy_with_logits,
}


def _public_callables(g: fx.Graph) -> None:
    """Call each operation of `_PUBLIC` through its public binding (the check that follows a
    capture covers this too)."""
    for node in g.nodes:
        if node.op == "call_function" and node.target in _PUBLIC:
            node.target = _PUBLIC[node.target]


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(value)
    return value
