"""Validation rejects broken plans with a message that says what is wrong."""

from __future__ import annotations

import re

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlap.errors import PlanError
from overlap.ops_graph.templates import ParallelConfig, build_model
from overlap.plan import (
    STRATEGIES,
    Batch,
    Step,
    Stream,
    Wait,
    build_plan,
    check_rank_symmetry,
    collective_order,
    split,
    validate,
)
from tests.strategies import batches
from tests.test_plan import TWO, _plan


def _with_steps(plan, steps):
    return attrs.evolve(plan, steps=steps)


def test_consumer_before_its_cross_stream_producer_is_a_missing_event():
    """Experts issued before the dispatch they read: the wait would precede the record."""
    plan = _plan()
    at = plan.index()
    steps = list(plan.steps)
    i, j = at[0, 0, "dispatch"], at[0, 0, "experts"]
    steps.insert(i, steps.pop(j))
    with pytest.raises(PlanError, match=re.escape(
            "plan 'deepseek_prefill': experts (layer 0, microbatch 0, stream compute) is issued "
            "before dispatch (layer 0, microbatch 0, stream comm), which it waits for: the event "
            "would be waited on before it is recorded")):
        validate(_with_steps(plan, steps))


def test_duplicate_step_is_rejected():
    """The same (layer, microbatch, op) twice."""
    plan = _plan()
    with pytest.raises(PlanError, match=r"^plan 'deepseek_prefill': step attn\(0\)@0 is issued twice$"):
        validate(_with_steps(plan, [*plan.steps, plan.steps[0]]))


def test_missing_step_is_rejected():
    """A plan that never issues one (microbatch, op)."""
    plan = _plan()
    with pytest.raises(PlanError, match=re.escape(
            "plan 'deepseek_prefill': merge(1)@1 is never issued (27 of 28 steps present)")):
        validate(_with_steps(plan, plan.steps[:-1]))


def test_collective_of_one_group_on_two_streams_is_rejected():
    """Dispatch and combine of group ep on different comm streams could reorder per rank."""
    plan = _plan()
    streams = (*plan.streams, plan.streams[1].__class__("comm2", "comm"))
    steps = [s._replace(stream=2) if s.op == "combine" else s for s in plan.steps]
    with pytest.raises(PlanError, match=re.escape(
            "plan 'deepseek_prefill': collectives of process group 'ep' are on streams comm, comm2")):
        validate(attrs.evolve(plan, streams=streams, steps=steps))


def test_collective_on_a_compute_stream_is_rejected():
    """A comm op placed on the compute stream."""
    plan = _plan()
    steps = [s._replace(stream=0) if s.op == "dispatch" else s for s in plan.steps]
    with pytest.raises(PlanError, match=re.escape(
            "step dispatch(0)@0: a comm op cannot run on compute stream 'compute'")):
        validate(_with_steps(plan, steps))


def test_wait_for_cycle_is_a_deadlock():
    """An explicit wait of an early step on a later one that depends on it deadlocks."""
    plan = _plan()
    at = plan.index()
    cycle = attrs.evolve(plan, extra_waits=[Wait(at[0, 0, "gate"], at[0, 0, "experts"])])
    with pytest.raises(PlanError, match=r"^plan 'deepseek_prefill' deadlocks: wait-for cycle gate "
                                        r"\(layer 0, microbatch 0, stream compute\) -> "):
        validate(cycle)


def test_extra_wait_outside_the_plan_is_rejected():
    """An explicit wait naming a step index that does not exist."""
    plan = attrs.evolve(_plan(), extra_waits=[Wait(1, 999)])
    with pytest.raises(PlanError, match=r"extra wait \(1, 999\) names a step outside 0\.\.27$"):
        validate(plan)


def test_asymmetric_collectives_across_ranks_are_rejected():
    """Rank 1 issuing microbatch 1's dispatch first would hang the ep group."""
    plan = _plan()
    at = plan.index()
    steps = list(plan.steps)
    a, b = at[0, 0, "dispatch"], at[0, 1, "dispatch"]
    moved = steps.pop(a)
    steps.insert(b, moved)
    other = _with_steps(plan, steps)
    with pytest.raises(PlanError, match=re.escape(
            "process group 'ep': collective #0 is dispatch(0)@0 on rank 0 but dispatch(1)@0 on "
            "rank 1; the ranks would hang")):
        check_rank_symmetry([plan, other])


def test_different_microbatch_counts_across_ranks_are_rejected():
    """Ranks must agree the microbatch count before planning."""
    with pytest.raises(PlanError, match="^rank 0 uses 2 microbatches but rank 1 uses 1"):
        check_rank_symmetry([_plan(), _plan(n=1)])


DEEPSEEK = build_model("deepseek-v3", ParallelConfig(ep=16), phase="prefill", num_layers=5)


@settings(max_examples=25, deadline=None)
@given(batches(), batches(), st.sampled_from([n for n in STRATEGIES if n != "auto"]))
def test_collective_order_does_not_depend_on_rank_data(a, b, name):
    """Two ranks with different batches and the same microbatch count issue the same collectives."""
    sa = split(a, 2, split_requests=True)
    sb = split(b, 2, split_requests=True)
    if sa.n != sb.n:
        sa = sb = None
    plans = [build_plan(name, DEEPSEEK, s) for s in ([sa, sb] if sa else
                                                     [split(a, 1), split(b, 1)])]
    assert collective_order(plans[0]) == collective_order(plans[1])
    check_rank_symmetry(plans)


def test_validate_returns_the_plan():
    """A valid plan passes through unchanged."""
    plan = _plan()
    assert validate(plan) is plan


def test_step_is_a_plain_tuple():
    """Steps serialise as (layer, micro, op, stream)."""
    assert tuple(Step(1, 0, "attn", 0)) == (1, 0, "attn", 0)


def test_plan_with_kv_dependency_validates_for_every_strategy():
    """A request cut between microbatches still gives a valid plan with each strategy."""
    s = split(Batch.prefill(64), 2, split_requests=True)
    for name in STRATEGIES:
        if name != "auto":
            validate(build_plan(name, TWO, s))


# -- rank symmetry against a rendezvous simulation ------------------------------------------------


def rendezvous(plans) -> str | None:
    """Run the ranks' plans the way a cluster would, as an oracle for the symmetry check.

    Each rank's streams run their steps in issue order once the step's inputs and explicit
    waits are done; the n-th collective of a group completes only when it heads its stream on
    every rank with its inputs done. Returns None when every step completes, "mismatch" when the
    ranks' n-th collectives of a group differ (they would exchange the wrong data or hang), else
    "hang".
    """
    from collections import deque

    ranks = []
    for plan in plans:
        comm = {id(g): {op.name: op.comm for op in g.ops if op.comm} for g in plan.model.distinct()}
        ordinal, count = {}, {}
        for i, s in enumerate(plan.steps):
            c = comm[id(plan.model.layers[s.layer])].get(s.op)
            if c is not None:
                ordinal[i] = (c.group, count.get(c.group, 0))
                count[c.group] = count.get(c.group, 0) + 1
                ordinal[i] += ((s.layer, s.micro, s.op, c.collective, c.size),)
        needs = [set(d) for d in plan.dependencies()]
        for w in plan.extra_waits:
            needs[w.waiter].add(w.on)
        queues = {}
        for i, s in enumerate(plan.steps):
            queues.setdefault(s.stream, deque()).append(i)
        ranks.append((ordinal, needs, queues, set()))
    while True:
        progressed = False
        heads = []  # per rank: (group, n) -> (signature, stream) of ready collectives at a head
        for ordinal, needs, queues, done in ranks:
            ready = {}
            for stream, q in queues.items():
                while q and needs[q[0]] <= done:
                    if q[0] in ordinal:
                        group, n, sig = ordinal[q[0]]
                        ready[group, n] = (sig, stream)
                        break
                    done.add(q.popleft())
                    progressed = True
            heads.append(ready)
        for key in set().union(*heads):
            if all(key in h for h in heads):
                if len({h[key][0] for h in heads}) > 1:
                    return "mismatch"
                for (_, _, queues, done), h in zip(ranks, heads):
                    done.add(queues[h[key][1]].popleft())
                progressed = True
        if not progressed:
            break
    return None if all(not any(queues.values()) for _, _, queues, _ in ranks) else "hang"


# Three dense layers then one MoE layer, with TP attention: tp and ep collectives share a stream.
TP_EP = build_model("deepseek-v3", ParallelConfig(tp=2, ep=16), phase="prefill", num_layers=4)


def _moved(plan, i, j):
    """``plan`` with step ``i`` moved to position ``j`` of the host order."""
    steps = list(plan.steps)
    steps.insert(j, steps.pop(i))
    return _with_steps(plan, steps)


def test_tp_and_ep_collectives_swapped_on_one_stream_hang():
    """The issue's case: rank 1 issues an EP dispatch before a TP all-reduce on the comm stream
    both share. Each group's own order agrees across ranks, yet each rank's stream waits for a
    collective the other rank has queued behind the other one."""
    base = build_plan("deepseek_prefill", TP_EP, split(Batch.prefill(64, 4), 2))
    at = base.index()
    ep, tp = at[3, 0, "dispatch"], at[2, 1, "ffn_allreduce"]
    assert base.steps[ep].stream == base.steps[tp].stream and ep < tp
    rank1 = validate(_moved(base, tp, ep))
    assert collective_order(base) == collective_order(rank1)
    assert rendezvous([base, rank1]) == "hang"
    with pytest.raises(PlanError, match=re.escape(
            "stream 'comm': rank 0 issues dispatch(0)@3 before ffn_allreduce(1)@2 but rank 1 "
            "issues ffn_allreduce(1)@2 before dispatch(0)@3; each rank's stream waits for the "
            "other's collective: the ranks would hang")):
        check_rank_symmetry([base, rank1])


def test_plans_for_different_ep_sizes_are_rejected():
    """EP16 on one rank and EP8 on another: same op order, different communicators."""
    s = split(Batch.prefill(64, 4), 2)
    ep16, ep8 = (build_plan("deepseek_prefill", build_model("deepseek-v3", ParallelConfig(ep=ep),
                                                            num_layers=4), s) for ep in (16, 8))
    with pytest.raises(PlanError, match=re.escape(
            "process group 'ep': dispatch(0)@3 is all_to_all over 16 ranks on rank 0 but "
            "all_to_all over 8 ranks on rank 1: the plans were built for different deployments")):
        check_rank_symmetry([ep16, ep8])


def test_cycle_through_two_comm_streams_is_a_hang():
    """TP collectives on one comm stream, EP on another. Rank 0 delays an EP dispatch until a TP
    all-reduce, rank 1 the all-reduce until the dispatch: each plan is valid and no stream shows
    the clash, but the ranks wait for each other."""
    base = build_plan("deepseek_prefill", TP_EP, split(Batch.prefill(64, 4), 2))
    tp_ops = ("attn_allreduce", "ffn_allreduce")
    two = attrs.evolve(base, streams=[*base.streams, Stream("comm_tp", "comm")],
                       steps=[s._replace(stream=2) if s.op in tp_ops else s for s in base.steps])
    at = two.index()
    ep, tp = at[3, 0, "dispatch"], at[2, 1, "ffn_allreduce"]
    assert ep < tp
    rank0 = validate(attrs.evolve(_moved(two, tp, ep), extra_waits=[Wait(ep + 1, ep)]))
    rank1 = validate(attrs.evolve(two, extra_waits=[Wait(tp, ep)]))
    assert rendezvous([rank0, rank1]) == "hang"
    with pytest.raises(PlanError, match=re.escape(
            "the ranks' plans would hang: wait-for cycle across ranks ")):
        check_rank_symmetry([rank0, rank1])
    assert rendezvous([rank1, rank1]) is None
    check_rank_symmetry([rank1, rank1])


def _group(plan, i):
    s = plan.steps[i]
    return plan.model.layers[s.layer][s.op].comm.group


def _perturbed(plan, rnd, tries: int = 30):
    """``plan`` after one random change that keeps it valid on its own (the first of ``tries``
    candidates that validates, else unchanged): a collective moved ahead of an earlier one on
    its stream, any step moved, or an explicit wait of one collective on an earlier one."""
    steps, n = plan.steps, len(plan.steps)
    comms = [i for i, s in enumerate(steps) if plan.streams[s.stream].kind == "comm"]
    move = rnd.choice(["collective", "collective", "step", "wait"])
    for _ in range(tries):
        if move == "step" or len(comms) < 2:
            candidate = _moved(plan, rnd.randrange(n), rnd.randrange(n))
        else:
            i, j = sorted(rnd.sample(comms, 2))
            others = [k for k in comms if k > i and steps[k].stream == steps[i].stream
                      and _group(plan, k) != _group(plan, i)]
            if move == "collective" and others and rnd.random() < 0.9:
                j = rnd.choice(others)  # another group's collective overtakes: can hang
            if move == "wait":
                candidate = attrs.evolve(plan, extra_waits=[*plan.extra_waits, Wait(j, i)])
            elif steps[i].stream == steps[j].stream:
                candidate = _moved(plan, j, i)
            else:
                continue
        try:
            return validate(candidate)
        except PlanError:
            continue
    return plan


SYMMETRY_MODELS = [TP_EP, TP_EP, DEEPSEEK, TWO]  # TP_EP has two groups on one stream


@st.composite
def rank_plans(draw):
    """2-3 ranks' plans of one strategy on one model, each rank with its own batch, most with a
    few random changes that keep each plan valid on its own (moves of collectives ahead of each
    other, the moves that can hang, are the most frequent); sometimes one process group moved to
    a second comm stream on every rank."""
    model = draw(st.sampled_from(SYMMETRY_MODELS))
    name = draw(st.sampled_from([n for n in STRATEGIES if n != "auto"]))
    n = draw(st.sampled_from([2, 2, 1]))
    groups = sorted({op.comm.group for g in model.distinct() for op in g.ops if op.comm})
    moved_group = draw(st.sampled_from([None, *groups]))
    rnd = draw(st.randoms(use_true_random=False))
    plans = []
    for _ in range(draw(st.integers(2, 3))):
        s = split(draw(batches(max_requests=4)), n, split_requests=True)
        if s.n != n:
            s = split(Batch.prefill(64, 4), n, split_requests=True)
        plan = build_plan(name, model, s)
        if moved_group and len(plan.streams) > 1:
            ops = {op.name for g in model.distinct() for op in g.ops
                   if op.comm and op.comm.group == moved_group}
            streams = [*plan.streams, Stream("comm_x", "comm")]
            plan = attrs.evolve(plan, streams=streams, steps=[
                s._replace(stream=len(streams) - 1) if s.op in ops else s for s in plan.steps])
        for _ in range(draw(st.integers(0, 3))):
            plan = _perturbed(plan, rnd)
        plans.append(plan)
    return plans


@settings(max_examples=150, deadline=None)
@given(rank_plans())
def test_symmetry_check_rejects_exactly_the_plans_that_hang(plans):
    """Every set of rank plans the rendezvous simulation completes passes the check; every set
    that hangs or mismatches a collective is rejected."""
    outcome = rendezvous(plans)
    if outcome is None:
        check_rank_symmetry(plans)
    else:
        with pytest.raises(PlanError, match="hang"):
            check_rank_symmetry(plans)
