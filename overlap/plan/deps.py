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
    that pass a value straight through."""
    while layer > 0:
        graph, prev = graphs[layer], graphs[layer - 1]
        out = prev.outputs[graph.inputs.index(value)]
        if out in prev.producer:
            return layer - 1, prev.producer[out]
        layer, value = layer - 1, out
    return None


def step_dependencies(plan: Plan) -> list[tuple[int, ...]]:
    """For each step of ``plan`` (by index), the indices of the steps it depends on.

    Assumes every (layer, micro, op) appears once; missing producers are skipped here and
    reported by validation.
    """
    graphs = list(plan.model.layers)
    index = plan.index()
    carries = [m.continues_request for m in plan.split.micro]
    cross_cache: dict[tuple[int, str], tuple[tuple[int, str], ...]] = {}
    kv_cache: dict[int, tuple[str, str] | None] = {}
    out: list[tuple[int, ...]] = []
    for step in plan.steps:
        layer, micro, op_name, _ = step
        if not 0 <= layer < len(graphs) or op_name not in graphs[layer]:
            out.append(())
            continue
        graph = graphs[layer]
        deps = [index.get((layer, micro, d)) for d in graph.deps[op_name]]
        key = (layer, op_name)
        if key not in cross_cache:
            srcs = {_input_sources(graphs, layer, v) for v in graph[op_name].reads if v in graph.inputs}
            cross_cache[key] = tuple(s for s in srcs if s is not None)
        deps.extend(index.get((lay, micro, name)) for lay, name in cross_cache[key])
        if micro > 0 and carries[micro]:
            gid = id(graph)
            if gid not in kv_cache:
                kv_cache[gid] = kv_ops(graph)
            kv = kv_cache[gid]
            if kv and op_name == kv[1]:
                deps.append(index.get((layer, micro - 1, kv[0])))
        out.append(tuple(sorted({d for d in deps if d is not None})))
    return out
