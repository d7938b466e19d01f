"""The ops graph: dependencies from data flow, validation errors, JSON, fusing, rendering."""

from __future__ import annotations

import pytest
from hypothesis import given

from overlap import GraphError
from overlap.ops_graph import (
    Collective,
    Comm,
    Formula,
    Graph,
    GraphBuilder,
    ModelGraph,
    Op,
    OpCost,
    OpKind,
    Shape,
)
from tests.strategies import graphs


def chain() -> Graph:
    b = GraphBuilder("moe", ("hidden",))
    b.compute("attn", "hidden", "h")
    b.comm("dispatch", Collective.ALL_TO_ALL, "ep", "h", "recv", size=4)
    b.compute("experts", "recv", "out")
    return b.build("out")


def test_dependencies_come_from_data_flow():
    """An op depends on the producers of the values it reads."""
    g = chain()
    assert g.deps == {"attn": (), "dispatch": ("attn",), "experts": ("dispatch",)}
    assert g.producer["recv"] == "dispatch"


def test_ops_may_be_declared_in_any_order():
    """The topological order does not depend on the order ops are listed in."""
    g = chain()
    shuffled = Graph("moe", reversed(g.ops), g.inputs, g.outputs)
    assert shuffled.order == ("attn", "dispatch", "experts")


def test_cycle_is_rejected_with_its_ops():
    """A cycle names the ops on it."""
    ops = [Op("a", "compute", ("x", "c"), "b"), Op("b", "compute", "b", "c"),
           Op("out", "compute", "x", "y")]
    with pytest.raises(GraphError, match=r"cycle (a -> b -> a|b -> a -> b)"):
        Graph("g", ops, "x", ("y",))


def test_read_without_producer_is_rejected():
    """A value nobody writes and that is no input names the reader."""
    with pytest.raises(GraphError, match="op 'a' reads 'nope', which no op writes and is not a graph input"):
        Graph("g", [Op("a", "compute", "nope", "y")], "x", "y")


def test_value_written_twice_is_rejected():
    """Two writers of one value are both named."""
    ops = [Op("a", "compute", "x", "y"), Op("b", "compute", "x", "y")]
    with pytest.raises(GraphError, match="value 'y' is written by both op 'a' and op 'b'"):
        Graph("g", ops, "x", "y")


def test_writing_a_graph_input_is_rejected():
    """Graph inputs are written by the previous layer, never by an op."""
    with pytest.raises(GraphError, match="value 'x' is a graph input and is also written by op 'a'"):
        Graph("g", [Op("a", "compute", "x", "x")], "x", "x")


def test_dangling_value_is_rejected():
    """A value computed and never used is a mistake."""
    ops = [Op("a", "compute", "x", ("y", "unused"))]
    with pytest.raises(GraphError, match="value 'unused' written by op 'a' is never read"):
        Graph("g", ops, "x", "y")


def test_missing_output_is_rejected():
    """Every declared output must be produced."""
    with pytest.raises(GraphError, match="output 'z' is neither written by an op nor a graph input"):
        Graph("g", [Op("a", "compute", "x", "y")], "x", ("y", "z"))


def test_duplicate_op_name_is_rejected():
    """Op names are unique."""
    ops = [Op("a", "compute", "x", "y"), Op("a", "compute", "y", "z")]
    with pytest.raises(GraphError, match="op name 'a' is used twice"):
        Graph("g", ops, "x", "z")


def test_unknown_kind_is_rejected():
    """An op kind outside COMPUTE/COMM/HOST is refused."""
    with pytest.raises(ValueError, match="'gpu' is not a valid OpKind"):
        Op("a", "gpu", "x", "y")


def test_unknown_kind_in_json_is_rejected():
    """JSON with an unknown kind lists the valid ones."""
    data = chain().to_dict()
    data["ops"][0]["kind"] = "gpu"
    with pytest.raises(GraphError, match="op 'attn': unknown kind 'gpu'; valid: compute, comm, host"):
        Graph.from_dict(data)


def test_comm_op_needs_a_collective():
    """A COMM op without a collective, or a compute op with one, is refused."""
    with pytest.raises(ValueError, match="op 'd' needs a 'comm'"):
        Op("d", OpKind.COMM, "x", "y")
    with pytest.raises(ValueError, match="op 'c' is compute and must not have a 'comm'"):
        Op("c", OpKind.COMPUTE, "x", "y", comm=Comm("all_reduce", "tp", 2))


def test_names_must_be_identifiers():
    """Op and value names are identifiers, so JSON and renderings stay unambiguous."""
    with pytest.raises(ValueError, match="'name' must be a Python identifier"):
        Op("two words", "compute", "x", "y")
    with pytest.raises(ValueError, match="value name 'a-b' is not an identifier"):
        Op("a", "compute", "a-b", "y")


@given(graphs())
def test_json_round_trip(graph):
    """Any valid graph survives JSON unchanged, and its JSON text is stable."""
    text = graph.to_json()
    again = Graph.from_json(text)
    assert again == graph
    assert again.to_json() == text
    assert again.order == graph.order


@given(graphs())
def test_topological_order_respects_dependencies(graph):
    """Every op comes after the ops it depends on."""
    position = {name: i for i, name in enumerate(graph.order)}
    for name, deps in graph.deps.items():
        assert all(position[d] < position[name] for d in deps), graph


def test_invalid_json_is_a_graph_error():
    """Text that is not JSON gives a GraphError, not a decoder traceback."""
    with pytest.raises(GraphError, match="not valid JSON"):
        Graph.from_json("{")
    with pytest.raises(GraphError, match="'schema' must be 'overlap.graph/1'"):
        Graph.from_json("{}")


def test_fuse_sums_costs_and_keeps_external_values():
    """Fusing ops keeps what the group reads from and exposes to the rest of the graph."""
    b = GraphBuilder("g", "x")
    b.compute("a", "x", "y", cost=OpCost(flops=Formula(per_token=2)), fn=lambda x: x + 1)
    b.compute("b", "y", "z", cost=OpCost(flops=Formula(per_token=3)), fn=lambda y: y * 10)
    b.compute("c", ("z", "y"), "out", fn=lambda z, y: z - y)
    fused = b.build("out").fuse(["a", "b"], "ab")
    assert fused["ab"].reads == ("x",) and fused["ab"].writes == ("y", "z")
    assert fused["ab"].cost(Shape(tokens=10)).flops == 50
    assert fused["ab"].fn(1) == (2, 20)


def test_fuse_refuses_collectives():
    """A collective cannot be fused into compute."""
    with pytest.raises(GraphError, match=r"only compute ops can be fused \(not \['dispatch'\]\)"):
        chain().fuse(["attn", "dispatch"], "x")


def test_render_lists_ops_in_order_with_costs():
    """The text rendering shows each op's kind, data flow and cost."""
    text = chain().render(Shape(tokens=8))
    assert text.splitlines()[0] == "graph moe: hidden -> out  (shape: 8 tokens, 0 requests)"
    assert "dispatch  comm all_to_all@ep[4]" in text
    assert text.index("attn ") < text.index("dispatch") < text.index("experts")


def test_model_graph_checks_layer_arity():
    """Consecutive layers must agree on how many values flow between them."""
    one = Graph("one", [Op("a", "compute", "x", "y")], "x", "y")
    two = Graph("two", [Op("a", "compute", ("x", "r"), "y")], ("x", "r"), "y")
    with pytest.raises(GraphError, match=r"layer 0 \(one\) has 1 outputs but layer 1 \(two\) takes 2 inputs"):
        ModelGraph("m", [one, two])
    assert str(ModelGraph("m", [one, one, one])) == "model m (3 layers; 0-2: one)"


def test_model_graph_json_round_trip_shares_layers():
    """A model's JSON stores each distinct layer graph once."""
    g = chain()
    m = ModelGraph("m", [g] * 5)
    data = m.to_dict()
    assert len(data["graphs"]) == 1 and data["layers"] == [0] * 5
    assert ModelGraph.from_dict(data) == m
