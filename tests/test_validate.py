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
