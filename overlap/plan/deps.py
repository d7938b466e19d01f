"""Which steps of a plan depend on which: data flow within and across layers and microbatches."""

from __future__ import annotations

from collections.abc import Sequence
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


def unordered_kv_reads(plan: Plan, continues: Sequence[bool] | None = None) -> list[str]:
    """Where ``plan`` lets a microbatch's attention run before the previous microbatch has
    written the KV cache it reads; one line per (layer, microbatch), empty when none.

    ``continues[m]`` says microbatch ``m`` continues a request the previous one cut (default:
    the plan's own split). Only what every backend honours counts: a stream runs its steps in
    issue order, and a step that waits runs after the step it waits on. A plan built for the
    split it runs always passes (:func:`step_dependencies` adds the KV read, which becomes a
    wait across streams); the check guards a plan reused for another split of its shape, or one
    made by hand or loaded from JSON.
    """
    flags = [m.continues_request for m in plan.split.micro] if continues is None else list(continues)
    cut = [m for m, flag in enumerate(flags) if flag and 0 < m < plan.n_micro]
    if not cut:
        return []
    steps, n_streams = plan.steps, len(plan.streams)
    waits_on: dict[int, list[int]] = {}
    for w in plan.waits():
        waits_on.setdefault(w.waiter, []).append(w.on)
    # clock[i][s]: the latest step of stream s known to finish before step i starts (or i
    # itself): a vector clock, filled in issue order (a valid plan waits only on earlier steps).
    clock: list[list[int]] = []
    last_on: list[list[int] | None] = [None] * n_streams
    for i, step in enumerate(steps):
        now = list(last_on[step.stream] or [-1] * n_streams)
        for on in waits_on.get(i, ()):
            if on < i:
                now = [max(a, b) for a, b in zip(now, clock[on])]
        now[step.stream] = i
        clock.append(now)
        last_on[step.stream] = now
    index = plan.index()
    gaps = []
    for layer, graph in enumerate(plan.model.layers):
        kv = kv_ops(graph)
        if kv is None:
            continue
        for m in cut:
            writer, reader = index.get((layer, m - 1, kv[0])), index.get((layer, m, kv[1]))
            if writer is None or reader is None:
                continue  # a missing step is validation's to report
            if clock[reader][steps[writer].stream] < writer:
                gaps.append(f"{kv[1]} (layer {layer}, microbatch {m}, stream "
                            f"{plan.streams[steps[reader].stream].name}) may run before "
                            f"{kv[0]} (layer {layer}, microbatch {m - 1}, stream "
                            f"{plan.streams[steps[writer].stream].name}) writes the KV cache "
                            "it reads: neither stream order nor a wait puts it after")
    return gaps
