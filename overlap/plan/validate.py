"""Validation of a plan against its graph, before anything runs.

A plan that passes cannot deadlock, reads every value after it is written, and issues the
collectives of each process group in an order that does not depend on the rank's data — a
mismatched collective order hangs a cluster, so it must be caught on CPU, not on the cluster.
"""

from __future__ import annotations

from collections import defaultdict

from overlap._cycles import find_cycle
from overlap.errors import PlanError
from overlap.ops_graph.op import OpKind
from overlap.plan.plan import Plan, Step
from overlap.plan.symmetry import check_rank_symmetry, collective_order

__all__ = ["check_rank_symmetry", "collective_order", "step_label", "validate"]


def validate(plan: Plan) -> Plan:
    """Check ``plan`` and return it; raise :class:`~overlap.errors.PlanError` saying what is wrong.

    1. every (layer, microbatch, op) is issued exactly once, on a stream of the right kind;
    2. the collectives of each process group are all on one stream (their order is then fixed);
    3. no wait-for cycle among stream order, data dependencies and explicit waits (deadlock);
    4. every dependency is issued before the step that needs it (an event is recorded before
       anyone waits on it).
    """
    tables = _op_tables(plan)
    _check_coverage(plan, tables)
    _check_groups(plan, tables)
    deps = plan.dependencies()
    _check_deadlock(plan, deps)
    _check_order(plan, deps)
    return plan


def _name(plan: Plan, i: int) -> str:
    s = plan.steps[i]
    return f"{s.op} (layer {s.layer}, microbatch {s.micro}, stream {plan.streams[s.stream].name})"


def _op_tables(plan: Plan) -> list[dict[str, tuple[OpKind, str | None]]]:
    """Per layer, each op's kind and process group (None unless a collective); layers sharing a
    graph share the table."""
    by_graph: dict[int, dict[str, tuple[OpKind, str | None]]] = {}
    for g in plan.model.distinct():
        by_graph[id(g)] = {op.name: (op.kind, op.comm.group if op.comm else None) for op in g.ops}
    return [by_graph[id(g)] for g in plan.model.layers]


def _check_coverage(plan: Plan, tables: list[dict[str, tuple[OpKind, str | None]]]) -> None:
    layers, n_micro, streams = plan.model.layers, plan.n_micro, plan.streams
    accepts = [{kind: s.accepts(kind) for kind in OpKind} for s in streams]
    n_layers, n_streams = len(layers), len(streams)
    for step in plan.steps:
        layer, micro, op, stream = step
        if not (type(layer) is type(micro) is type(stream) is int  # a bool is an int: excluded
                and 0 <= layer < n_layers and 0 <= micro < n_micro and 0 <= stream < n_streams
                and op in tables[layer] and accepts[stream][tables[layer][op][0]]):
            _bad_step(plan, step)
    keys = {s[:3] for s in plan.steps}
    if len(keys) != len(plan.steps):
        seen: set[tuple[int, int, str]] = set()
        for step in plan.steps:
            if step[:3] in seen:
                raise PlanError(f"plan {plan.strategy!r}: step {_key(step[:3])} is issued twice")
            seen.add(step[:3])
    expected = sum(len(g) for g in layers) * n_micro
    if len(keys) != expected:
        for layer, graph in enumerate(layers):
            for micro in range(n_micro):
                for op in graph.order:
                    if (layer, micro, op) not in keys:
                        raise PlanError(f"plan {plan.strategy!r}: {op}({micro})@{layer} is never "
                                        f"issued ({len(keys)} of {expected} steps present)")
    bounds = [*plan.slots, len(plan.steps)]
    if not plan.slots or plan.slots[0] != 0 or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise PlanError(f"plan {plan.strategy!r}: slot starts {plan.slots} must begin at 0 and "
                        f"increase up to {len(plan.steps)}")


def _bad_step(plan: Plan, step: Step) -> None:
    """Raise the error that explains why ``step`` cannot be issued."""
    layers, n_micro, streams = plan.model.layers, plan.n_micro, plan.streams
    layer, micro, op, stream = step
    where = f"plan {plan.strategy!r}: step {op}({micro})@{layer}"
    if not all(type(v) is int for v in (layer, micro, stream)) or not isinstance(op, str):
        raise PlanError(f"{where}: a step is (layer, microbatch, op, stream) with integer layer, "
                        f"microbatch and stream and a string op (got {tuple(step)!r})")
    if not 0 <= layer < len(layers):
        raise PlanError(f"{where}: layer {layer} out of range 0..{len(layers) - 1}")
    if not 0 <= micro < n_micro:
        raise PlanError(f"{where}: microbatch {micro} out of range 0..{n_micro - 1}")
    if op not in layers[layer]:
        raise PlanError(f"{where}: layer {layer} ({layers[layer].name}) has no op {op!r}")
    if not 0 <= stream < len(streams):
        raise PlanError(f"{where}: stream {stream} out of range 0..{len(streams) - 1}")
    kind = layers[layer][op].kind
    raise PlanError(f"{where}: a {kind.value} op cannot run on {streams[stream].kind} "
                    f"stream {streams[stream].name!r}")


def _check_groups(plan: Plan, tables: list[dict[str, tuple[OpKind, str | None]]]) -> None:
    streams_of: dict[str, set[str]] = defaultdict(set)
    for layer, _, op, stream in plan.steps:
        group = tables[layer][op][1]
        if group is not None:
            streams_of[group].add(plan.streams[stream].name)
    for group, names in sorted(streams_of.items()):
        if len(names) > 1:
            raise PlanError(
                f"plan {plan.strategy!r}: collectives of process group {group!r} are on streams "
                f"{', '.join(sorted(names))}; their relative order would depend on timing and "
                "could differ between ranks (put them on one stream)"
            )


def _check_deadlock(plan: Plan, deps: list[tuple[int, ...]]) -> None:
    # Wait-for graph: a step waits for its stream predecessor, its inputs and explicit waits.
    # Stream predecessors come earlier in host order; only an edge to a later step can close a
    # cycle, so the search runs only when there is one.
    n = len(plan.steps)
    for w in plan.extra_waits:
        if not (0 <= w.waiter < n and 0 <= w.on < n):
            raise PlanError(f"plan {plan.strategy!r}: extra wait {tuple(w)} names a step outside 0..{n - 1}")
    if all(d < i for i, ds in enumerate(deps) for d in ds) and all(
            w.on < w.waiter for w in plan.extra_waits):
        return
    waits_for: list[list[int]] = [list(d) for d in deps]
    last: dict[int, int] = {}
    for i, step in enumerate(plan.steps):
        if step.stream in last:
            waits_for[i].append(last[step.stream])
        last[step.stream] = i
    for w in plan.extra_waits:
        waits_for[w.waiter].append(w.on)
    cycle = find_cycle(range(n), waits_for.__getitem__)
    if cycle is not None:
        raise PlanError(f"plan {plan.strategy!r} deadlocks: wait-for cycle "
                        + " -> ".join(_name(plan, i) for i in cycle))


def _check_order(plan: Plan, deps: list[tuple[int, ...]]) -> None:
    late = [(i, ds[-1]) for i, ds in enumerate(deps) if ds and ds[-1] >= i]
    for waiter, on in [*late, *(tuple(w) for w in plan.extra_waits)]:
        if on >= waiter:
            raise PlanError(
                f"plan {plan.strategy!r}: {_name(plan, waiter)} is issued before "
                f"{_name(plan, on)}, which it waits for: the event would be waited on before it "
                "is recorded"
            )


def _key(k: tuple[int, int, str]) -> str:
    return f"{k[2]}({k[1]})@{k[0]}"


def step_label(step: Step) -> str:
    return _key(step.key)
