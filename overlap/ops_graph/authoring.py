"""Two ways to write a graph: a builder, and decorators on a layer's methods.

The decorators let a model author describe a layer next to its code::

    class MoELayer(nn.Module):
        @op.compute(reads="hidden", writes=("x", "topk"), role=Role.GATE)
        def gate(self, hidden): ...

        @op.comm(Collective.ALL_TO_ALL, group="ep", reads=("x", "topk"), writes="recv")
        def dispatch(self, x, topk): ...

    graph = graph_of(layer, inputs="hidden", outputs="out")

A decorated method takes its ``reads`` as positional arguments and returns its ``writes`` (a
tuple when there are several). The decorator only attaches a description; the method still works
as an ordinary method. ``graph_of(cls)`` gives the graph without callables (for simulation),
``graph_of(instance)`` binds each op to the instance's method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import attrs

from overlap.errors import GraphError
from overlap.ops_graph.cost import FREE, OpCost
from overlap.ops_graph.graph import Graph
from overlap.ops_graph.op import Collective, Comm, Op, OpKind, Routing

F = TypeVar("F", bound=Callable[..., Any])
Names = str | Iterable[str]
_MARK = "__overlap_op__"


class GraphBuilder:
    """Collects ops one call at a time, then :meth:`build` validates them into a :class:`Graph`."""

    def __init__(self, name: str, inputs: Names) -> None:
        self.name = name
        self.inputs = inputs
        self._ops: list[Op] = []

    def add(self, op: Op) -> GraphBuilder:
        """Append an op made elsewhere."""
        self._ops.append(op)
        return self

    def compute(self, name: str, reads: Names, writes: Names, *, cost: OpCost = FREE,
                role: str = "", fn: Callable[..., Any] | None = None) -> GraphBuilder:
        """Append a compute op."""
        return self.add(Op(name, OpKind.COMPUTE, reads, writes, cost=cost, role=role, fn=fn))

    def comm(self, name: str, collective: Collective | str, group: str, reads: Names,
             writes: Names, *, size: int = 1, cost: OpCost = FREE, role: str = "",
             fn: Callable[..., Any] | None = None, routing: Routing | None = None) -> GraphBuilder:
        """Append a collective on process group ``group`` of ``size`` ranks (``routing``: how an
        expert all-to-all's tokens fan out)."""
        comm = Comm(collective, group, size, routing)
        return self.add(Op(name, OpKind.COMM, reads, writes, comm=comm, cost=cost, role=role, fn=fn))

    def host(self, name: str, reads: Names, writes: Names, *, cost: OpCost = FREE,
             role: str = "", fn: Callable[..., Any] | None = None) -> GraphBuilder:
        """Append an op that blocks the host."""
        return self.add(Op(name, OpKind.HOST, reads, writes, cost=cost, role=role, fn=fn))

    def build(self, outputs: Names) -> Graph:
        """Validate and return the graph; raises :class:`~overlap.errors.GraphError`."""
        return Graph(self.name, self._ops, self.inputs, outputs)


# A cost or group size may be given as a value or as a function of the layer instance, so it
# can depend on the layer's configuration (hidden size, expert count, parallel sizes).
CostSpec = OpCost | Callable[[Any], OpCost]
SizeSpec = int | Callable[[Any], int]


@attrs.frozen
class _Spec:
    kind: OpKind
    reads: Names
    writes: Names
    role: str
    cost: CostSpec
    collective: Collective | None = None
    group: str = ""
    size: SizeSpec = 1
    name: str | None = None

    def make(self, method_name: str, owner: Any, fn: Callable[..., Any] | None) -> Op:
        bound = not isinstance(owner, type)
        cost, size = self.cost, self.size
        if bound and not isinstance(cost, OpCost):
            cost = cost(owner)
        if bound and not isinstance(size, int):
            size = size(owner)
        if not isinstance(cost, OpCost):
            cost = FREE  # a cost that needs the instance is unknown on the bare class
        if not isinstance(size, int):
            size = 1
        comm = Comm(self.collective, self.group, size) if self.collective else None
        return Op(self.name or method_name, self.kind, self.reads, self.writes, comm=comm,
                  cost=cost, role=self.role, fn=fn)


class _Decorators:
    """``op.compute``, ``op.comm`` and ``op.host``: mark a method as one op of its layer."""

    def compute(self, *, reads: Names = (), writes: Names = (), role: str = "",
                cost: CostSpec = FREE, name: str | None = None) -> Callable[[F], F]:
        """Mark a method as a compute op."""
        return _mark(_Spec(OpKind.COMPUTE, reads, writes, role, cost, name=name))

    def comm(self, collective: Collective | str, *, group: str, size: SizeSpec = 1,
             reads: Names = (), writes: Names = (), role: str = "", cost: CostSpec = FREE,
             name: str | None = None) -> Callable[[F], F]:
        """Mark a method as a collective on process group ``group``."""
        spec = _Spec(OpKind.COMM, reads, writes, role, cost, Collective(collective), group, size,
                     name)
        return _mark(spec)

    def host(self, *, reads: Names = (), writes: Names = (), role: str = "",
             cost: CostSpec = FREE, name: str | None = None) -> Callable[[F], F]:
        """Mark a method as an op that blocks the host."""
        return _mark(_Spec(OpKind.HOST, reads, writes, role, cost, name=name))


def _mark(spec: _Spec) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        setattr(fn, _MARK, spec)
        return fn

    return decorate


op = _Decorators()


def graph_of(layer: Any, *, inputs: Names, outputs: Names, name: str | None = None) -> Graph:
    """The graph of the ``@op``-decorated methods of ``layer`` (a class or an instance).

    Methods are collected from base classes first, in definition order; a subclass overriding a
    decorated method replaces it. With an instance, each op is bound to its method.
    """
    cls = layer if isinstance(layer, type) else type(layer)
    methods: dict[str, _Spec] = {}
    for klass in reversed(cls.__mro__):
        for attr, value in vars(klass).items():
            spec = getattr(value, _MARK, None)
            if isinstance(spec, _Spec):
                methods[attr] = spec
            elif attr in methods:
                del methods[attr]  # overridden without the decorator: no longer an op
    if not methods:
        raise GraphError(f"{cls.__name__} has no methods decorated with @op.compute/comm/host")
    bound = not isinstance(layer, type)
    ops = [spec.make(attr, layer, getattr(layer, attr) if bound else None)
           for attr, spec in methods.items()]
    return Graph(name or cls.__name__, ops, inputs, outputs)
