"""Rewrites of a captured ATen graph that keep its value and gradient.

`simplify` runs on graphs that `pyrovae.capture` has recorded without mutations: no operation
in them changes a tensor, except a random draw into a fresh allocation that nothing else reads
and, in functionalized graphs, the `copy_` into an input (a buffer) that ends the graph. So a
node's value is fixed by its inputs, and constants can be folded and duplicates merged, with two
exceptions that no rewrite touches: random draws, and allocations whose contents are undefined
(`empty`, `new_empty`) or that exist to be distinct (`clone`). Every rewrite states its
preconditions (no keyword arguments it does not read, the dtypes and shapes it assumes, the
detachedness it relies on) and leaves the node alone where they fail; the capture's check
against the program stands behind all of them.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

__all__ = ["simplify"]

aten = torch.ops.aten
_NO_OP_VALUES = {aten.add.Tensor: 0, aten.sub.Tensor: 0, aten.mul.Tensor: 1, aten.div.Tensor: 1}
_SHAPE_OPS = {aten.view.default, aten.expand.default, aten._unsafe_view.default, aten.reshape.default}
# Never folded or merged: two calls must give two tensors (undefined or distinct contents).
_ALLOCATIONS = {
    aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default, aten.new_empty.default,
    aten.new_empty_strided.default, aten.clone.default,
}


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
    _fresh_outputs(graph)
    _public_callables(g)
    graph.recompile()


def _call(value: Any, target: Any, nargs: int | None = None) -> fx.Node | None:
    """`value` if it is a call of `target` without keyword arguments (and with `nargs` arguments)."""
    if isinstance(value, fx.Node) and value.op == "call_function" and value.target is target and not value.kwargs \
            and (nargs is None or len(value.args) == nargs):
        return value
    return None


def _shape(node: Any) -> torch.Size | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.shape if torch.is_tensor(value) else None


def _dtype(node: Any) -> torch.dtype | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dtype if torch.is_tensor(value) else None


def _like(a: Any, b: Any) -> bool:
    """Both nodes hold tensors of one shape and one dtype."""
    return _shape(a) is not None and _shape(a) == _shape(b) and _dtype(a) == _dtype(b)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pure(target: Any) -> bool:
    """Same inputs, same output, nothing else touched: random draws, in-place ops and allocations are not."""
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return not (target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags or target in _ALLOCATIONS)


def _no_op_input(graph: fx.GraphModule, node: fx.Node, constant: set[fx.Node]) -> fx.Node | None:
    """The input that `node` returns unchanged (same shape and dtype), if it is a no-op."""
    target, args = node.target, node.args
    if not args or not isinstance(args[0], fx.Node) or not _like(args[0], node):
        return None
    first = args[0]
    if target is aten.lift_fresh_copy.default or target in _SHAPE_OPS:
        return first  # a copy of a constant made every call, a reshape to the same shape (nothing is mutated)
    if target not in _NO_OP_VALUES or len(args) != 2 or node.kwargs:  # alpha=, rounding_mode= change the value
        return None
    other, identity = args[1], _NO_OP_VALUES[target]
    if isinstance(other, fx.Node):  # x + zeros, x * ones, with constant tensors
        value = getattr(graph, other.target) if other in constant else None
        return first if torch.is_tensor(value) and bool((value == identity).all()) else None
    return first if _number(other) and other == identity else None


def _fold(graph: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """Evaluate `node`, whose inputs are all constants, once: the constant that replaces it
    (None, and the node stays, where the result is not one tensor)."""
    def value(n: fx.Node) -> Any:
        return getattr(graph, n.target)

    result = node.target(*fx.node.map_arg(node.args, value), **fx.node.map_arg(node.kwargs, value))
    if not torch.is_tensor(result) or result.requires_grad:
        return None
    name = f"_folded{sum(1 for n in graph.graph.nodes if n.op == 'get_attr')}"
    graph.register_buffer(name, result)
    with graph.graph.inserting_before(node):
        new = graph.graph.get_attr(name)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.graph.erase_node(node)
    return new


def _detached(g: fx.Graph) -> set[fx.Node]:
    """The nodes through which no gradient flows: detaches, constants, and pure functions of those."""
    detached: set[fx.Node] = set()
    for node in g.nodes:
        if node.op == "get_attr" or _call(node, aten.detach.default):
            detached.add(node)
        elif node.op == "call_function" and _pure(node.target) and all(n in detached for n in node.all_input_nodes):
            detached.add(node)
    return detached


def _drop_surrogate(g: fx.Graph) -> None:
    """Pyro returns `loss + (surrogate - detach(surrogate))`, where `loss` repeats the surrogate's
    arithmetic on detached terms: the same value and gradient as `surrogate` alone. Two nodes
    compute the same value when they are equal with every detach seen through; `loss` must be
    detached, or the rewrite would drop its gradient."""
    ids: dict[Any, int] = {}
    key: dict[fx.Node, int] = {}
    for node in g.nodes:
        if _call(node, aten.detach.default, 1):
            key[node] = key[node.args[0]]
        elif node.op == "call_function" and _pure(node.target):
            shape = (node.target, _hashable(fx.node.map_arg(node.args, lambda n: ("node", key[n]))),
                     _hashable(fx.node.map_arg(node.kwargs, lambda n: ("node", key[n]))))
            key[node] = ids.setdefault(shape, len(ids))
        else:
            key[node] = ids.setdefault(("unique", id(node)), len(ids))
    detached = _detached(g)
    for node in list(g.nodes):
        if not _call(node, aten.add.Tensor, 2):
            continue
        for loss, correction in (node.args, node.args[::-1]):
            sub = _call(correction, aten.sub.Tensor, 2)
            if sub is None or not isinstance(loss, fx.Node) or loss not in detached:
                continue
            surrogate, stopped = sub.args
            if _call(stopped, aten.detach.default, 1) and stopped.args[0] is surrogate and key[loss] == key[surrogate] \
                    and _like(surrogate, node):
                node.replace_all_uses_with(surrogate)
                g.erase_node(node)
                break


def _standardized_draws(g: fx.Graph) -> None:
    """A Normal's log-density at its own reparameterized draw z = loc + scale * eps:
    -(z - loc)^2 / (2 scale^2) -> -eps^2 / 2, with z - loc -> scale * eps first. Equal in exact
    arithmetic, value and gradient (both are free of loc and scale); this is how a hand-written
    loss computes it, with four fewer operations per site."""
    for sub in [n for n in g.nodes if _call(n, aten.sub.Tensor, 2)]:
        z, loc = sub.args
        draw = _call(z, aten.add.Tensor, 2)
        if draw is not None and draw.args[0] is loc and isinstance(draw.args[1], fx.Node) \
                and _like(draw.args[1], sub) and _like(loc, sub):
            sub.replace_all_uses_with(draw.args[1])  # (loc + scale * eps) - loc -> scale * eps
    for div in [n for n in g.nodes if _call(n, aten.div.Tensor, 2)]:
        neg, twice_var = div.args
        square = _call(neg.args[0], aten.pow.Tensor_Scalar, 2) if _call(neg, aten.neg.default, 1) else None
        product = _call(square.args[0], aten.mul.Tensor, 2) if square is not None and square.args[1] == 2 else None
        doubled = _call(twice_var, aten.mul.Tensor, 2)
        var = _call(doubled.args[0], aten.pow.Tensor_Scalar, 2) if doubled is not None and doubled.args[1] == 2 else None
        if product is None or var is None or var.args[1] != 2 or not _like(div, product):
            continue
        eps, scale = product.args
        if scale is not var.args[0]:
            eps, scale = scale, eps
        if scale is not var.args[0] or not isinstance(eps, fx.Node) or not _like(eps, div):
            continue
        _replace(g, div, aten.mul.Tensor, (_insert(g, div, aten.pow.Tensor_Scalar, (eps, 2)), -0.5))


def _summed_elements(node: fx.Node, shape: torch.Size) -> int | None:
    """How many elements of `shape` the sum `node` adds into each output (None: not a plain sum)."""
    if _call(node, aten.sum.default, 1):
        dims: Any = range(len(shape))
    elif _call(node, aten.sum.dim_IntList) and len(node.args) in (2, 3):
        dims = node.args[1]
        if dims is None or len(dims) == 0:  # ATen: dim=None and dim=[] both sum every element
            dims = range(len(shape))
    else:
        return None
    count = 1
    for d in {d % len(shape) for d in dims} if len(shape) else ():
        count *= shape[d]
    return count


def _constants_after_sum(g: fx.Graph) -> None:
    """sum(x - c, dims) -> sum(x, dims) - c n, c a number, n the elements summed per output: the
    normalizing constant of a log-density is subtracted once per example, not once per element."""
    for node in list(g.nodes):
        inner = node.args[0] if node.op == "call_function" and node.args else None
        if not (_call(inner, aten.sub.Tensor, 2) and len(inner.users) == 1 and _number(inner.args[1])
                and _like(inner, inner.args[0]) and _dtype(inner).is_floating_point and _dtype(node) == _dtype(inner)):
            continue
        count = _summed_elements(node, _shape(inner))
        if count is None:
            continue
        total = _insert(g, node, node.target, (inner.args[0], *node.args[1:]))
        _replace(g, node, aten.sub.Tensor, (total, inner.args[1] * count))


def _factor(graph: fx.GraphModule, node: Any) -> tuple[fx.Node, float] | None:
    """(x, k) where `node` computes x * k for a number k: a product or quotient by a number or a
    0-dim constant, or a negation; x of the node's shape and floating dtype."""
    if _call(node, aten.neg.default, 1):
        x, k = node.args[0], -1.0
    elif _call(node, aten.mul.Tensor, 2) or _call(node, aten.div.Tensor, 2):
        x, k = node.args
        if isinstance(k, fx.Node) and k.op == "get_attr":  # a constant tensor of one repeated number
            value = getattr(graph, k.target)
            uniform = torch.is_tensor(value) and value.dtype.is_floating_point and value.numel() > 0 and bool((value == value.flatten()[0]).all())
            k = value.flatten()[0].item() if uniform else None
        if not _number(k) or k == 0:
            return None
        k = float(k) if node.target is aten.mul.Tensor else 1.0 / k
    else:
        return None
    if not isinstance(x, fx.Node) or not _like(x, node) or not _dtype(node).is_floating_point:
        return None  # a broadcast, or a constant of another dtype promoted the product
    return x, k


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
    if k == 1.0 and _like(x, node):
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
        if _call(node, aten.sum.default, 1) or (_call(node, aten.sum.dim_IntList) and len(node.args) in (2, 3)):
            inner = node.args[0]
            factor = _factor(graph, inner)
            if factor is not None and len(inner.users) == 1 and _dtype(inner) == _dtype(node):
                total = _insert(g, node, node.target, (factor[0], *node.args[1:]))
                _scale(g, node, total, factor[1])


def _common_factors(graph: fx.GraphModule) -> None:
    """x * k + y * k -> (x + y) * k (and likewise for -): the terms of a bound share its scale."""
    g = graph.graph
    for node in list(g.nodes):
        if not (_call(node, aten.add.Tensor, 2) or _call(node, aten.sub.Tensor, 2)):
            continue
        left, right = (_factor(graph, a) for a in node.args)
        if left is None or right is None or left[1] != right[1] or any(len(a.users) != 1 for a in node.args):
            continue
        if not _like(left[0], node) or not _like(right[0], node):
            continue
        _scale(g, node, _insert(g, node, node.target, (left[0], right[0])), left[1])


def _nested_sums(g: fx.Graph) -> None:
    """sum(sum(x, dims)) -> sum(x): the total of per-example totals in one reduction."""
    for node in list(g.nodes):
        if _call(node, aten.sum.default, 1):
            inner = _call(node.args[0], aten.sum.dim_IntList)
            if inner is not None and len(inner.users) == 1 and len(inner.args) in (2, 3) and _dtype(inner) == _dtype(node) \
                    and _dtype(inner.args[0]) == _dtype(node):
                _replace(g, node, aten.sum.default, (inner.args[0],))


def _offset(node: Any) -> tuple[Any, float]:
    """(x, c) with `node` = x + c for a number c (c = 0 where `node` adds none)."""
    call = _call(node, aten.add.Tensor, 2) or _call(node, aten.sub.Tensor, 2)
    if call is not None and _number(call.args[1]) and len(call.users) == 1 and _like(call.args[0], call) \
            and _dtype(call).is_floating_point:
        return call.args[0], float(call.args[1]) * (1 if call.target is aten.add.Tensor else -1)
    return node, 0.0


def _constants_outward(g: fx.Graph) -> None:
    """(x + a) + (y + b) -> (x + y) + (a + b), and likewise for -: a bound's normalizing constants
    meet in one number, which is dropped when they cancel."""
    for node in list(g.nodes):
        if not (_call(node, aten.add.Tensor, 2) or _call(node, aten.sub.Tensor, 2)):
            continue
        if not all(isinstance(a, fx.Node) for a in node.args):
            continue
        (x, a), (y, b) = (_offset(arg) for arg in node.args)
        if a == 0.0 and b == 0.0 or not _like(x, node) or not _like(y, node):
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
        while inner is not None and len(x.users) == 1:
            x, k = inner[0], k * inner[1]
            inner = _factor(graph, x)
        if x is outer[0] and not (node.target is aten.div.Tensor and k != -1.0):
            continue  # nothing merged, and nothing gained by rewriting
        _scale(g, node, x, k)


def _fuse_randn(g: fx.Graph) -> None:
    """normal(empty(shape)) -> randn(shape): one call, the same draws from the same generator."""
    for node in list(g.nodes):
        if _call(node, aten.normal_functional.default, 1) or _call(node, aten.normal_.default, 1):
            empty = node.args[0]
            if isinstance(empty, fx.Node) and empty.target is aten.empty.memory_format and len(empty.args) == 1 \
                    and len(empty.users) == 1 and set(empty.kwargs) <= {"dtype", "layout", "device", "pin_memory"}:
                _replace(g, node, aten.randn.default, empty.args, dict(empty.kwargs))
                g.erase_node(empty)


def _fuse_linear(g: fx.Graph) -> None:
    """addmm(b, x, t(w)) -> linear(x, w, b): one call that decomposes in C++, not two from Python."""
    for node in list(g.nodes):
        if _call(node, aten.addmm.default, 3):
            bias, x, wt = node.args
            if _call(wt, aten.t.default, 1) and _shape(bias) is not None and len(_shape(bias)) == 1:
                _replace(g, node, aten.linear.default, (x, wt.args[0], bias))


def _fresh_outputs(graph: fx.GraphModule) -> None:
    """A graph returns new tensors: a folded constant or an input it would return is cloned, so
    that a caller who changes the result in place changes nothing the graph keeps."""
    g = graph.graph
    output = next(n for n in g.nodes if n.op == "output")

    def fresh(value: Any) -> Any:
        if isinstance(value, fx.Node) and value.op in ("get_attr", "placeholder"):
            return _insert(g, output, aten.clone.default, (value,))
        return value

    output.args = fx.node.map_aggregate(output.args, fresh)


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
    if isinstance(value, (bool, float)):
        return (type(value).__name__, value)  # 1.0, 1 and True are different arguments (they promote differently)
    return value
