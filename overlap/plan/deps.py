"""Which steps of a plan depend on which: data flow within and across layers and microbatches."""

from __future__ import annotations

from typing import TYPE_CHECKING

from overlap.ops_graph.graph import Graph
from overlap.ops_graph.op import Role

if TYPE_CHECKING:
    from overlap.plan.plan import Plan

KV_VALUE = "kv_cache"
_ATTN_ROLES = (Role.ATTN, Role.ATTN1)


def kv_ops(graph: Graph) -> tuple[str, str] | None:
    """(op that writes the KV cache, op that reads it for attention) in a layer, if any.

    The templates name the value ``kv_cache``; when attention is one fused op, that op both
    writes and reads it.
    """
    if KV_VALUE in graph.producer:
        readers = [op.name for op in graph if KV_VALUE in op.reads]
        return (graph.producer[KV_VALUE], readers[0]) if readers else None
    for role in _ATTN_ROLES:
        ops = graph.of_role(role)
        if ops:
            return ops[0].name, ops[0].name
    return None


def _input_sources(graphs: list[Graph], layer: int, value: str) -> tuple[int, str] | None:
    """(layer, op) that produced graph input ``value`` of ``layer``, looking back through layers
    that pass a value straight through; None when it is the model's own input."""
    while layer > 0:
        graph, prev = graphs[layer], graphs[layer - 1]
        out = prev.outputs[graph.inputs.index(value)]
        if out in prev.producer:
            return layer - 1, prev.producer[out]
        layer, value = layer - 1, out
    return None


def _layer_tables(graphs: list[Graph]) -> list[dict[str, tuple[tuple[str, ...], tuple]]]:
    """Per layer: each op's producers in the same layer, and (layer, op) producers of the graph
    inputs it reads in earlier layers. Layers with the same graph and predecessor share a table."""
    tables = []
    shared: dict[tuple[int, int], dict] = {}
    for layer, graph in enumerate(graphs):
        key = (id(graph), id(graphs[layer - 1]) if layer else 0)
        reach_back = layer > 1 and key in shared and _passes_through(graphs[layer - 1])
        if key in shared and not reach_back:
            tables.append(shared[key])
            continue
        table = {}
        inputs = set(graph.inputs)
        for op in graph.ops:
            srcs = {_input_sources(graphs, layer, v) for v in op.reads if v in inputs}
            cross = tuple((src[0] - layer, src[1]) for src in srcs if src is not None)
            table[op.name] = (graph.deps[op.name], cross)
        shared[key] = table
        tables.append(table)
    return tables


def _passes_through(graph: Graph) -> bool:
    """Whether some output of ``graph`` is one of its inputs (so sources reach further back)."""
    return any(v not in graph.producer for v in graph.outputs)


def step_dependencies(plan: Plan) -> list[tuple[int, ...]]:
    """For each step of ``plan`` (by index), the indices of the steps it depends on.

    Assumes every (layer, micro, op) appears once; missing producers are skipped here and
    reported by validation.
    """
    graphs = list(plan.model.layers)
    index = plan.index()
    get = index.get
    tables = _layer_tables(graphs)
    carries = [m.continues_request for m in plan.split.micro]
    kv_reader: dict[int, tuple[str, str] | None] = {}
    n_layers = len(graphs)
    out: list[tuple[int, ...]] = []
    append = out.append
    for layer, micro, op_name, _ in plan.steps:
        entry = tables[layer].get(op_name) if 0 <= layer < n_layers else None
        if entry is None:
            append(())
            continue
        intra, cross = entry
        deps = [get((layer, micro, d)) for d in intra]
        for offset, name in cross:
            deps.append(get((layer + offset, micro, name)))
        if micro > 0 and micro < len(carries) and carries[micro]:
            graph = graphs[layer]
            if id(graph) not in kv_reader:
                kv_reader[id(graph)] = kv_ops(graph)
            kv = kv_reader[id(graph)]
            if kv and op_name == kv[1]:
                deps.append(get((layer, micro - 1, kv[0])))
        found = [d for d in deps if d is not None]
        append(tuple(sorted(set(found))) if len(found) > 1 else tuple(found))
    return out
