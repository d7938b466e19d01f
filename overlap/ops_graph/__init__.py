"""The declarative graph of a layer's compute and communication ops."""

from overlap.ops_graph.authoring import GraphBuilder, graph_of, op
from overlap.ops_graph.cost import CostFigures, Formula, OpCost
from overlap.ops_graph.graph import Graph, ModelGraph
from overlap.ops_graph.op import Collective, Comm, Op, OpKind, Role, Routing
from overlap.ops_graph.shape import Shape

__all__ = [
    "Collective",
    "Comm",
    "CostFigures",
    "Formula",
    "Graph",
    "GraphBuilder",
    "ModelGraph",
    "Op",
    "OpCost",
    "OpKind",
    "Role",
    "Routing",
    "Shape",
    "graph_of",
    "op",
]
