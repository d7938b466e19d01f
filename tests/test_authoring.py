"""The authoring API: a layer's methods decorated as ops become its graph."""

from __future__ import annotations

import pytest

from overlap import GraphError
from overlap.ops_graph import Collective, Formula, OpCost, OpKind, Role, Shape, graph_of, op


class TinyMoE:
    """A plain-Python stand-in for an nn.Module layer."""

    def __init__(self, ep: int = 2, scale: int = 3) -> None:
        self.ep = ep
        self.scale = scale

    @op.compute(reads="hidden", writes=("x", "topk"), role=Role.GATE,
                cost=lambda self: OpCost(flops=Formula(per_token=2.0 * self.scale)))
    def gate(self, hidden):
        return hidden + 1, hidden % 2

    @op.comm(Collective.ALL_TO_ALL, group="ep", size=lambda self: self.ep, reads=("x", "topk"),
             writes="recv", role=Role.DISPATCH)
    def dispatch(self, x, topk):
        return x * 10 + topk

    @op.compute(reads="recv", writes="out", role=Role.EXPERTS)
    def experts(self, recv):
        return recv * self.scale

    def helper(self):
        return "not an op"


def test_decorated_methods_become_ops_bound_to_the_instance():
    """graph_of(instance) binds each op to its method and evaluates instance-dependent specs."""
    layer = TinyMoE(ep=4, scale=5)
    g = graph_of(layer, inputs="hidden", outputs="out")
    assert g.order == ("gate", "dispatch", "experts")
    assert g["dispatch"].kind is OpKind.COMM and g["dispatch"].comm.size == 4
    assert g["gate"].cost(Shape(tokens=10)).flops == 100
    x, topk = g["gate"].fn(3)
    assert g["experts"].fn(g["dispatch"].fn(x, topk)) == (4 * 10 + 1) * 5


def test_graph_of_class_has_no_callables():
    """graph_of(cls) describes the layer for simulation, without binding."""
    g = graph_of(TinyMoE, inputs="hidden", outputs="out")
    assert all(o.fn is None for o in g.ops)
    assert g["dispatch"].comm.size == 1  # the size needs an instance


def test_decorated_methods_still_work_as_methods():
    """Decorating does not change what a method does."""
    assert TinyMoE(scale=2).experts(4) == 8


def test_subclass_override_without_decorator_drops_the_op():
    """Overriding an op method with a plain method removes it from the graph."""

    class NoExperts(TinyMoE):
        def experts(self, recv):
            return recv

        @op.compute(reads="recv", writes="out")
        def finish(self, recv):
            return recv

    g = graph_of(NoExperts(), inputs="hidden", outputs="out")
    assert g.order == ("gate", "dispatch", "finish")


def test_undecorated_class_is_an_error():
    """A class with no ops says so."""

    class Plain:
        pass

    with pytest.raises(GraphError, match="Plain has no methods decorated with @op"):
        graph_of(Plain, inputs="x", outputs="y")
