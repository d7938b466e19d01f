"""Rank symmetry: the plans of different ranks must issue collectives that match and cannot hang.

Ranks hold different tokens, so their splits, and possibly their plans, differ. What orders
collectives at run time is:

- a process group (communicator) matches collectives by position: the n-th collective of group
  ``g`` on one rank meets the n-th of ``g`` on every other, so each group's sequence must be the
  same everywhere (op, layer, microbatch, collective and group size);
- a stream runs its kernels in issue order and a collective holds its stream until every rank
  has reached it, so a stream that carries collectives of several groups imposes its order on
  all of them; across streams, event waits (data dependencies, explicit waits) order a
  collective after the work it needs.

A hang is a cycle of such waits that crosses ranks: rank 0's comm stream issues a TP all-reduce
before an EP dispatch and rank 1's the reverse, and each stream waits for the other rank. The
check builds one wait-for graph of all ranks, where each collective is a single node shared by
its ranks, and rejects any cycle, naming it. Two collectives issued in opposite order on the
same stream of two ranks (the usual mistake) get a direct message first.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from overlap._cycles import find_cycle
from overlap.errors import PlanError
from overlap.plan.plan import Plan

# (layer, microbatch, op, collective, group size): what two ranks' n-th collectives must share.
Signature = tuple[int, int, str, str, int]


def collective_order(plan: Plan) -> dict[str, list[tuple[int, int, str]]]:
    """Per process group, the (layer, microbatch, op) of each collective in issue order."""
    return {group: [sig[:3] for _, sig in items] for group, items in _collectives(plan).items()}


def _collectives(plan: Plan) -> dict[str, list[tuple[int, Signature]]]:
    """Per process group, (step index, signature) of each collective in issue order."""
    tables = {}
    for g in plan.model.distinct():
        tables[id(g)] = {op.name: (op.comm.group, op.comm.collective.value, op.comm.size)
                         for op in g.ops if op.comm is not None}
    layers = [tables[id(g)] for g in plan.model.layers]
    out: dict[str, list[tuple[int, Signature]]] = defaultdict(list)
    for i, (layer, micro, op, _) in enumerate(plan.steps):
        comm = layers[layer].get(op) if 0 <= layer < len(layers) else None
        if comm is not None:
            group, collective, size = comm
            out[group].append((i, (layer, micro, op, collective, size)))
    return dict(out)


def _label(sig: Signature) -> str:
    return f"{sig[2]}({sig[1]})@{sig[0]}"


def check_rank_symmetry(plans: Sequence[Plan]) -> None:
    """Raise :class:`~overlap.errors.PlanError` unless the ranks' plans, each already
    validated, issue matching collectives in orders that cannot hang (see the module doc)."""
    if len(plans) < 2:
        return
    for rank, plan in enumerate(plans[1:], start=1):
        if plan.n_micro != plans[0].n_micro:
            raise PlanError(f"rank 0 uses {plans[0].n_micro} microbatches but rank {rank} uses "
                            f"{plan.n_micro}: agree the count across ranks first (plan.split.agree)")
    per_rank = [_collectives(p) for p in plans]
    _check_groups_match(per_rank)
    node_of = _collective_nodes(per_rank)
    _check_stream_orders(plans, per_rank, node_of)
    _check_no_cycle(plans, per_rank, node_of)


def _check_groups_match(per_rank: list[dict[str, list[tuple[int, Signature]]]]) -> None:
    reference = per_rank[0]
    for rank, groups in enumerate(per_rank[1:], start=1):
        for group in sorted(set(reference) | set(groups)):
            a = [sig for _, sig in reference.get(group, [])]
            b = [sig for _, sig in groups.get(group, [])]
            for pos, (x, y) in enumerate(zip(a, b)):
                if x[:3] != y[:3]:
                    raise PlanError(
                        f"process group {group!r}: collective #{pos} is {_label(x)} on rank 0 but "
                        f"{_label(y)} on rank {rank}; the ranks would hang"
                    )
                if x[3:] != y[3:]:
                    raise PlanError(
                        f"process group {group!r}: {_label(x)} is {x[3]} over {x[4]} ranks on "
                        f"rank 0 but {y[3]} over {y[4]} ranks on rank {rank}: the plans were "
                        "built for different deployments; the ranks would hang"
                    )
            if len(a) != len(b):
                raise PlanError(f"process group {group!r}: rank 0 issues {len(a)} collectives, "
                                f"rank {rank} issues {len(b)}; the ranks would hang")


def _collective_nodes(per_rank: list[dict[str, list[tuple[int, Signature]]]]) -> list[dict[int, int]]:
    """Per rank, step index -> id of the shared collective node (the groups already match)."""
    ids: dict[tuple[str, int], int] = {}
    out = []
    for groups in per_rank:
        node_of = {}
        for group, items in groups.items():
            for pos, (i, _) in enumerate(items):
                node_of[i] = ids.setdefault((group, pos), len(ids))
        out.append(node_of)
    return out


def _check_stream_orders(plans: Sequence[Plan], per_rank: list[dict[str, list[tuple[int, Signature]]]],
                         node_of: list[dict[int, int]]) -> None:
    """Two collectives on the same stream of two ranks in opposite order: a direct message."""
    def on_streams(rank: int) -> dict[str, list[int]]:
        plan, out = plans[rank], defaultdict(list)
        for i in sorted(node_of[rank]):
            out[plan.streams[plan.steps[i].stream].name].append(i)
        return out

    sig = [{i: s for items in groups.values() for i, s in items} for groups in per_rank]
    reference = on_streams(0)
    for rank in range(1, len(plans)):
        for name, steps in on_streams(rank).items():
            position = {node_of[0][i]: k for k, i in enumerate(reference.get(name, ()))}
            latest: int | None = None  # step on this rank with the greatest rank-0 position
            for i in steps:
                pos = position.get(node_of[rank][i])
                if pos is None:
                    continue
                if latest is not None and pos < position[node_of[rank][latest]]:
                    x, y = sig[rank][latest], sig[rank][i]
                    raise PlanError(
                        f"stream {name!r}: rank 0 issues {_label(y)} before {_label(x)} but rank "
                        f"{rank} issues {_label(x)} before {_label(y)}; each rank's stream waits "
                        "for the other's collective: the ranks would hang"
                    )
                if latest is None or pos > position[node_of[rank][latest]]:
                    latest = i


def _check_no_cycle(plans: Sequence[Plan], per_rank: list[dict[str, list[tuple[int, Signature]]]],
                    node_of: list[dict[int, int]]) -> None:
    """Depth-first search of the joint wait-for graph: stream order, dependencies and explicit
    waits of every rank, with each collective one node shared by all ranks."""
    shared = max((max(n.values(), default=-1) for n in node_of), default=-1) + 1
    offsets, total = [], shared
    for plan in plans:
        offsets.append(total)
        total += len(plan.steps)

    def node(rank: int, i: int) -> int:
        found = node_of[rank].get(i)
        return offsets[rank] + i if found is None else found

    waits_for: list[list[int]] = [[] for _ in range(total)]
    for rank, plan in enumerate(plans):
        last: dict[int, int] = {}
        for i, (step, deps) in enumerate(zip(plan.steps, plan.dependencies())):
            edges = waits_for[node(rank, i)]
            edges.extend(node(rank, d) for d in deps)
            if step.stream in last:
                edges.append(node(rank, last[step.stream]))
            last[step.stream] = i
        for w in plan.extra_waits:
            waits_for[node(rank, w.waiter)].append(node(rank, w.on))

    names: dict[int, str] = {}
    for rank, groups in enumerate(per_rank):
        for group, items in groups.items():
            for i, s in items:
                names.setdefault(node_of[rank][i], f"{_label(s)} [group {group!r}, every rank]")

    def name(n: int) -> str:
        if n in names:
            return names[n]
        rank = max(r for r, off in enumerate(offsets) if off <= n)
        plan = plans[rank]
        step = plan.steps[n - offsets[rank]]
        return f"{step.label()} [rank {rank}, stream {plan.streams[step.stream].name}]"

    cycle = find_cycle(range(total), waits_for.__getitem__)
    if cycle is not None:
        raise PlanError("the ranks' plans would hang: wait-for cycle across ranks "
                        + " -> ".join(name(c) for c in cycle))
