"""Turning a strategy's per-layer pattern into a Plan.

A *pattern* is the issue order of one layer slot, written over stages (see ``plan.stages``) as
entries ``(delta, micro, stage)``: "issue ``stage`` of microbatch ``micro`` of layer
``slot - delta``". ``delta = 1`` entries finish the previous layer inside this slot, which is what
overlaps one layer's tail with the next layer's head. Slot 0 (the prologue) drops the entries
of the non-existent layer -1; a final slot (the epilogue) keeps only the previous layer's tail.

A pattern is checked before it is expanded, so that every graph gives a valid plan:

- it names each (microbatch, stage) exactly once;
- a microbatch's ``delta = 1`` entries come before its ``delta = 0`` entries in the slot (the
  next layer reads what the previous layer's tail writes);
- every microbatch goes through the stages in the same order (the stages are assigned
  monotonically in that order, see ``plan.stages``);
- microbatch k issues each stage before microbatch k+1 does (a request cut between them writes
  its KV cache in k before k+1's attention reads it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from overlap.errors import ConfigError
from overlap.ops_graph.graph import Graph, ModelGraph
from overlap.ops_graph.op import Op, OpKind, Role
from overlap.plan.plan import DEFAULT_STREAMS, Plan, Step, Stream, Wait
from overlap.plan.split import Split
from overlap.plan.stages import STAGES, stages

Entry = tuple[int, int, str]  # (delta, micro, stage)
VECTOR_STREAM = Stream("vector", "compute")

# (delta, micro, op name, stream) in slot order, for one layer graph.
_Item = tuple[int, int, str, int]


def ping_pong(n_micro: int, groups: Sequence[Sequence[str]]) -> list[Entry]:
    """Each group of stages for microbatch 0, then for 1, ...; then the next group."""
    return [(0, m, stage) for group in groups for m in range(n_micro) for stage in group]


def in_order(n_micro: int) -> list[Entry]:
    """Microbatch after microbatch, each through every stage: no interleaving."""
    return [(0, m, stage) for m in range(n_micro) for stage in STAGES]


def staggered(n_micro: int, head: Sequence[Sequence[str]], tail: Sequence[str]) -> list[Entry]:
    """Round-robin over the groups of ``head``, each microbatch's ``tail`` running into the next
    layer: microbatch m > 0 finishes layer L-1 just before it starts layer L, and microbatch 0
    finishes layer L at the end of the slot.

    This is the order two executors that switch at every yield point produce (SGLang's stage
    executors, vLLM's ubatch threads) once a layer's last stage and the next layer's first stage
    run between the same two yields.
    """
    first, *rest = head
    pattern: list[Entry] = []
    for m in range(n_micro):
        if m:
            pattern += [(1, m, s) for s in tail]
        pattern += [(0, m, s) for s in first]
    pattern += [(0, m, s) for group in rest for m in range(n_micro) for s in group]
    return pattern + [(0, 0, s) for s in tail]


def default_stream(op: Op) -> int:
    """Collectives on the communication stream (1), everything else on the compute stream (0)."""
    return 1 if op.kind is OpKind.COMM else 0


def with_vector_stream(plan: Plan) -> Plan:
    """``plan`` with MLA's vector ops (role ``mla_vector``) moved to a second compute stream,
    ``vector``, appended to its streams: how multistream MLA composes with any order."""
    streams = plan.streams if VECTOR_STREAM in plan.streams else (*plan.streams, VECTOR_STREAM)
    vec = streams.index(VECTOR_STREAM)
    layers = plan.model.layers
    steps = [s._replace(stream=vec) if layers[s.layer][s.op].role == Role.MLA_VECTOR else s
             for s in plan.steps]
    return attrs.evolve(plan, streams=streams, steps=steps)


def build(name: str, model: ModelGraph, split: Split, pattern: Sequence[Entry], *,
          streams: Sequence[Stream] = DEFAULT_STREAMS,
          stream_of: Callable[[Op], int] = default_stream,
          options: dict | None = None,
          extra_waits: Callable[[list[Step]], list[Wait]] | None = None) -> Plan:
    """Expand ``pattern`` over every layer of ``model`` into an (unvalidated) Plan."""
    order = check_pattern(name, pattern, split.n)
    grouped = {id(g): stages(g, order) for g in model.distinct()}
    used = {s for groups in grouped.values() for s, ops in groups.items() if ops}
    check_pattern(name, pattern, split.n, used)
    per_graph = {id(g): _expand(g, grouped[id(g)], pattern, stream_of) for g in model.distinct()}
    layers = model.layers
    merged: dict[tuple[int, int], list[tuple[int, int, str, int]]] = {}
    steps: list[Step] = []
    slots: list[int] = []
    for slot in range(len(layers) + 1):
        cur = id(layers[slot]) if slot < len(layers) else 0
        prev = id(layers[slot - 1]) if slot else 0
        key = (prev, cur)
        if key not in merged:
            merged[key] = [(d, m, op, st) for d, m, op, st in _slot_items(per_graph, prev, cur)]
        items = merged[key]
        if not items:
            continue
        slots.append(len(steps))
        steps.extend([Step(slot - d, m, op, st) for d, m, op, st in items])
    waits = extra_waits(steps) if extra_waits else []
    return Plan(name, model, split, tuple(streams), steps, slots, waits, options or {})


def _slot_items(per_graph: dict[int, list[tuple[int, _Item]]], prev: int, cur: int) -> list[_Item]:
    """The items of one slot: the current layer's head, the previous layer's tail, by position."""
    items = [x for x in per_graph.get(cur, ()) if x[1][0] == 0]
    items += [x for x in per_graph.get(prev, ()) if x[1][0] == 1]
    items.sort(key=lambda x: x[0])
    return [item for _, item in items]


def _expand(graph: Graph, groups: dict[str, tuple[str, ...]], pattern: Sequence[Entry],
            stream_of: Callable[[Op], int]) -> list[tuple[int, _Item]]:
    out: list[tuple[int, _Item]] = []
    for delta, micro, stage in pattern:
        for name in groups[stage]:
            out.append((len(out), (delta, micro, name, stream_of(graph[name]))))
    return out


def check_pattern(name: str, pattern: Sequence[Entry], n_micro: int,
                  used: set[str] | None = None) -> tuple[str, ...]:
    """Raise :class:`ConfigError` unless ``pattern`` is well formed (see the module docstring);
    return the order microbatch 0 takes the stages in.

    used: the stages that hold ops (default: all); the ordering rules only concern those.
    """
    where = f"strategy {name!r}"
    entries = {(m, s) for _, m, s in pattern}
    missing = [(m, s) for m in range(n_micro) for s in STAGES if (m, s) not in entries]
    bad = [e for e in pattern if e[0] not in (0, 1) or not 0 <= e[1] < n_micro or e[2] not in STAGES]
    if bad:
        raise ConfigError(f"{where}: pattern entries {bad[:4]} are not (delta 0|1, microbatch "
                          f"0..{n_micro - 1}, stage); stages: {', '.join(STAGES)}")
    if missing or len(entries) != len(pattern):
        raise ConfigError(f"{where}: its pattern must name each (microbatch, stage) once for "
                          f"{n_micro} microbatch(es) (missing: {missing[:4]}, {len(pattern)} "
                          f"entries)")
    # Linear position over two consecutive slots: a delta-1 entry runs one slot later.
    pos = {(m, s): i + d * len(pattern) for i, (d, m, s) in enumerate(pattern)}
    live = [s for s in STAGES if used is None or s in used]
    orders = [tuple(sorted(live, key=lambda s, m=m: pos[m, s])) for m in range(n_micro)]
    for m in range(n_micro):
        if orders[m] != orders[0]:
            raise ConfigError(f"{where}: microbatch {m} goes through the stages in the order "
                              f"{', '.join(orders[m])}, microbatch 0 in {', '.join(orders[0])}; "
                              "all must use one order")
        mine = [d for d, mm, s in pattern if mm == m and s in live]
        if 1 in mine and 0 in mine[:max(i for i, d in enumerate(mine) if d == 1)]:
            raise ConfigError(f"{where}: microbatch {m} starts layer L before finishing layer "
                              "L-1 in the same slot; put its delta-1 entries first")
    for s in live:
        for m in range(1, n_micro):
            if pos[m, s] < pos[m - 1, s]:
                raise ConfigError(f"{where}: microbatch {m} issues stage {s!r} before microbatch "
                                  f"{m - 1}; microbatches must take each stage in turn")
    return tuple(sorted(STAGES, key=lambda s: pos[0, s]))
