"""Turning a strategy's per-layer pattern into a Plan.

A *pattern* is the issue order of one layer slot, written over stages (see ``plan.stages``) as
entries ``(delta, micro, stage)``: "issue ``stage`` of microbatch ``micro`` of layer
``slot - delta``". ``delta = 1`` entries finish the previous layer inside this slot, which is what
overlaps one layer's tail with the next layer's head. Slot 0 (the prologue) drops the entries
of the non-existent layer -1; a final slot (the epilogue) keeps only the previous layer's tail.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from overlap.errors import ConfigError
from overlap.ops_graph.graph import Graph, ModelGraph
from overlap.ops_graph.op import Op, OpKind, Role
from overlap.plan.plan import DEFAULT_STREAMS, Plan, Step, Stream, Wait
from overlap.plan.split import Split
from overlap.plan.stages import STAGES, stages

Entry = tuple[int, int, str]  # (delta, micro, stage)
VECTOR_STREAM = Stream("vector", "compute")


def ping_pong(n_micro: int, groups: Sequence[Sequence[str]]) -> list[Entry]:
    """Each group of stages for microbatch 0, then for 1, ...; then the next group."""
    return [(0, m, stage) for group in groups for m in range(n_micro) for stage in group]


def in_order(n_micro: int) -> list[Entry]:
    """Microbatch after microbatch, each through every stage: no interleaving."""
    return [(0, m, stage) for m in range(n_micro) for stage in STAGES]


def default_stream(op: Op) -> int:
    """Collectives on the communication stream (1), everything else on the compute stream (0)."""
    return 1 if op.kind is OpKind.COMM else 0


def vector_stream(op: Op) -> int:
    """As :func:`default_stream`, but MLA's vector work on the second compute stream (2)."""
    return 2 if op.role == Role.MLA_VECTOR else default_stream(op)


def build(name: str, model: ModelGraph, split: Split, pattern: Sequence[Entry], *,
          streams: Sequence[Stream] = DEFAULT_STREAMS,
          stream_of: Callable[[Op], int] = default_stream,
          options: dict | None = None,
          extra_waits: Callable[[list[Step]], list[Wait]] | None = None) -> Plan:
    """Expand ``pattern`` over every layer of ``model`` into an (unvalidated) Plan."""
    _check_pattern(name, pattern, split.n)
    per_graph: dict[int, list[tuple[float, int, int, Op]]] = {}
    for graph in model.distinct():
        per_graph[id(graph)] = _expand(graph, pattern)
    layers = model.layers
    steps: list[Step] = []
    slots: list[int] = []
    for slot in range(len(layers) + 1):
        items = []
        for delta in (0, 1):
            layer = slot - delta
            if not 0 <= layer < len(layers):
                continue
            items.extend((pos, layer, micro, op) for pos, d, micro, op in per_graph[id(layers[layer])]
                         if d == delta)
        if not items:
            continue
        items.sort(key=lambda item: item[0])
        slots.append(len(steps))
        steps.extend(Step(layer, micro, op.name, stream_of(op)) for _, layer, micro, op in items)
    waits = extra_waits(steps) if extra_waits else []
    return Plan(name, model, split, tuple(streams), steps, slots, waits, options or {})


def _expand(graph: Graph, pattern: Sequence[Entry]) -> list[tuple[float, int, int, Op]]:
    groups = stages(graph)
    out: list[tuple[float, int, int, Op]] = []
    n = len(pattern)
    for i, (delta, micro, stage) in enumerate(pattern):
        ops = groups[stage]
        for j, name in enumerate(ops):
            out.append(((i + j / (len(ops) + 1)) / n, delta, micro, graph[name]))
    return out


def _check_pattern(name: str, pattern: Sequence[Entry], n_micro: int) -> None:
    seen = {(m, s) for _, m, s in pattern}
    missing = [(m, s) for m in range(n_micro) for s in STAGES if (m, s) not in seen]
    if missing or len(seen) != len(pattern) or any(m >= n_micro for _, m, _ in pattern):
        raise ConfigError(f"strategy {name!r}: its pattern must name each (microbatch, stage) "
                          f"once for {n_micro} microbatches (missing: {missing[:4]})")
