"""The simulated backend: hand-computed timelines of tiny plans, and properties of real ones.

The test hardware runs 1e12 FLOP/s and moves 1e9 B/s with 1 µs of collective latency, so an op
of 1e7 FLOPs takes 10 µs and a two-rank all-to-all of 18 kB takes 1 + 9 = 10 µs.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlap.backends.simulated import simulate
from overlap.cost import get_hardware
from overlap.errors import ConfigError, PlanError
from overlap.ops_graph import Collective, Comm, Formula, Graph, ModelGraph, Op, OpCost, OpKind
from overlap.ops_graph.templates import ParallelConfig, build_model
from overlap.plan import NAMED, Batch, Plan, Step, Stream, Wait, build_plan, split
from overlap.report import metrics
from tests.strategies import graphs

US = 1e-6
HW = get_hardware("h100").evolve(
    bf16_tflops=1.0, vector_tflops=1.0, hbm_gbps=1e6, matrix_efficiency=1.0, vector_efficiency=1.0,
    intra_link_gbps=1.0, intra_link_efficiency=1.0, intra_latency_s=1e-6, launch_overhead_s=0.0,
    comm_compute_share=0.0, matrix_half_flops=0.0,
)
ASCEND = HW.evolve(separate_vector_units=True)
TWO = (Stream("compute", "compute"), Stream("comm", "comm"))


def matrix(us: float) -> OpCost:
    return OpCost(flops=Formula(const=us * 1e6))


def vector(us: float) -> OpCost:
    return OpCost(vector_flops=Formula(const=us * 1e6))


def a2a(name: str, reads: str, writes: str, us: float) -> Op:
    """A two-rank all-to-all taking ``us`` microseconds (1 µs latency + bytes / 2 / 1 GB/s)."""
    return Op(name, OpKind.COMM, reads, writes, comm=Comm(Collective.ALL_TO_ALL, "ep", 2),
              cost=OpCost(comm_bytes=Formula(const=(us - 1) * 2e3)))


def plan_of(ops: list[Op], steps: list[tuple[int, str, int]], streams=TWO, waits=()) -> Plan:
    """A one-layer plan over two one-token microbatches; steps are (micro, op, stream)."""
    graph = Graph("g", ops, "x", [w for op in ops for w in op.writes if w.startswith("out")])
    model = ModelGraph("m", [graph])
    return Plan("hand", model, split(Batch.prefill(2, 2), 2), streams,
                [Step(0, m, op, s) for m, op, s in steps], [0], waits)


def times(timeline) -> list[tuple[str, float, float]]:
    return [(s.label(), round(s.start / US, 6), round(s.end / US, 6)) for s in timeline.spans]


def compute_then_comm() -> list[Op]:
    return [Op("attn", OpKind.COMPUTE, "x", "a", cost=matrix(10)), a2a("dispatch", "a", "out", 10)]


def test_two_microbatches_overlap_comm_with_compute():
    """attn(1) runs while dispatch(0) is in flight: 30 µs instead of 40."""
    plan = plan_of(compute_then_comm(), [(0, "attn", 0), (0, "dispatch", 1), (1, "attn", 0),
                                         (1, "dispatch", 1)])
    assert times(simulate(plan, HW)) == [
        ("attn(0)@0", 0, 10), ("dispatch(0)@0", 10, 20), ("attn(1)@0", 10, 20),
        ("dispatch(1)@0", 20, 30)]


def test_one_stream_serialises_everything():
    """On a single mixed stream the same four steps take the sum of their times."""
    plan = plan_of(compute_then_comm(), [(0, "attn", 0), (0, "dispatch", 0), (1, "attn", 0),
                                         (1, "dispatch", 0)], streams=(Stream("main", "mixed"),))
    assert simulate(plan, HW).makespan == pytest.approx(40 * US)


def test_comm_share_slows_overlapped_compute():
    """A collective holding half the units halves attn(1)'s rate while it runs: 10 + 10 + 5 + 10."""
    plan = plan_of(compute_then_comm(), [(0, "attn", 0), (0, "dispatch", 1), (1, "attn", 0),
                                         (1, "dispatch", 1)])
    assert times(simulate(plan, HW, comm_compute_share=0.5)) == [
        ("attn(0)@0", 0, 10), ("dispatch(0)@0", 10, 20), ("attn(1)@0", 10, 25),
        ("dispatch(1)@0", 25, 35)]


def parallel_plan(first: OpCost, second: OpCost, streams=None) -> Plan:
    ops = [Op("p", OpKind.COMPUTE, "x", "out_p", cost=first),
           Op("q", OpKind.COMPUTE, "x", "out_q", cost=second)]
    streams = streams or (Stream("s0", "compute"), Stream("s1", "compute"))
    return plan_of(ops, [(0, "p", 0), (0, "q", 1), (1, "p", 0), (1, "q", 1)], streams=streams)


def test_concurrent_compute_halves_rates():
    """Two 10 µs matmuls on two streams share the units: both end at 20 µs, then 40 µs."""
    tl = simulate(parallel_plan(matrix(10), matrix(10)), HW)
    assert times(tl) == [("p(0)@0", 0, 20), ("q(0)@0", 0, 20), ("p(1)@0", 20, 40),
                         ("q(1)@0", 20, 40)]


def test_unequal_ops_speed_up_when_one_ends():
    """A 10 µs and a 30 µs op start together: the short one ends at 20, the long one at 40."""
    plan = plan_of([Op("p", OpKind.COMPUTE, "x", "out_p", cost=matrix(10)),
                    Op("q", OpKind.COMPUTE, "x", "out_q", cost=matrix(30))],
                   [(0, "p", 0), (0, "q", 1)], streams=(Stream("s0", "compute"), Stream("s1", "compute")))
    plan = Plan("hand", plan.model, split(Batch.prefill(1), 1), plan.streams,
                plan.steps, [0])
    assert times(simulate(plan, HW)) == [("p(0)@0", 0, 20), ("q(0)@0", 0, 40)]


def test_gpu_matrix_and_vector_work_share_the_sms():
    """Without separate vector units a matmul and a vector op slow each other."""
    tl = simulate(parallel_plan(matrix(10), vector(10)), HW)
    assert tl.makespan == pytest.approx(40 * US)


def test_ascend_matrix_and_vector_work_run_at_once():
    """With separate cube and vector cores, a matmul and a vector op both take 10 µs."""
    tl = simulate(parallel_plan(matrix(10), vector(10)), ASCEND)
    assert times(tl) == [("p(0)@0", 0, 10), ("q(0)@0", 0, 10), ("p(1)@0", 10, 20),
                         ("q(1)@0", 10, 20)]


def test_ascend_bound_serialises_one_compute_stream():
    """On one compute stream a matmul and a vector op cannot overlap, so the bound is their sum."""
    ops = [Op("mm", OpKind.COMPUTE, "x", "m", cost=matrix(10)),
           Op("vec", OpKind.COMPUTE, "m", "out", cost=vector(10))]
    plan = plan_of(ops, [(0, "mm", 0), (0, "vec", 0), (1, "mm", 0), (1, "vec", 0)])
    tl = simulate(plan, ASCEND)
    assert tl.bound_s == pytest.approx(40 * US) and tl.makespan == pytest.approx(40 * US)


def test_ascend_bound_with_two_compute_streams_is_per_unit():
    """With matrix and vector work on two compute streams, each unit's work bounds the step."""
    tl = simulate(parallel_plan(matrix(10), vector(10)), ASCEND)
    assert tl.bound_s == pytest.approx(20 * US)


def test_stream_share_caps_an_op_alone():
    """An op on a stream limited to half the units takes twice as long even when alone."""
    streams = (Stream("s0", "compute", share=0.5), Stream("s1", "compute"))
    plan = plan_of([Op("p", OpKind.COMPUTE, "x", "out_p", cost=matrix(10))], [(0, "p", 0), (1, "p", 0)],
                   streams=streams)
    assert simulate(plan, HW).makespan == pytest.approx(40 * US)


def test_stream_share_gives_the_rest_to_the_other_stream():
    """Caps 0.25 and none: the capped op gets 0.25, the other 0.75, until one ends."""
    streams = (Stream("s0", "compute", share=0.25), Stream("s1", "compute"))
    tl = simulate(parallel_plan(matrix(5), matrix(15), streams=streams), HW)
    # p: 5 µs of work at 0.25 -> 20 µs; q: 15 µs at 0.75 -> 20 µs; then the same again.
    assert times(tl)[:2] == [("p(0)@0", 0, 20), ("q(0)@0", 0, 20)]


def test_launch_overhead_is_paid_on_the_host():
    """With 1 µs launches, kernels start no earlier than their issue: 1 + 10 + 10."""
    hw = HW.evolve(launch_overhead_s=1e-6)
    plan = plan_of([Op("p", OpKind.COMPUTE, "x", "out", cost=matrix(10))], [(0, "p", 0), (1, "p", 0)])
    assert times(simulate(plan, hw)) == [("p(0)@0", 1, 11), ("p(1)@0", 11, 21)]


def test_host_op_blocks_later_issues():
    """Nothing is issued while a host op runs: q, on another stream, starts after it + a launch."""
    hw = HW.evolve(launch_overhead_s=1e-6)
    ops = [Op("h", OpKind.HOST, "x", "out_h", cost=matrix(10)),
           Op("q", OpKind.COMPUTE, "x", "out_q", cost=matrix(10))]
    streams = (Stream("s0", "compute"), Stream("s1", "compute"))
    plan = plan_of(ops, [(0, "h", 0), (0, "q", 1)], streams=streams)
    plan = Plan("hand", plan.model, split(Batch.prefill(1), 1), streams, plan.steps, [0])
    assert times(simulate(plan, hw)) == [("h(0)@0", 1, 11), ("q(0)@0", 12, 22)]


def test_extra_waits_are_honoured():
    """An extra wait holds an independent collective until the compute op it names has ended."""
    ops = [Op("p", OpKind.COMPUTE, "x", "out_p", cost=matrix(10)), a2a("d", "x", "out_d", 10)]
    steps = [(0, "p", 0), (0, "d", 1)]
    free = simulate(plan_of(ops, steps), HW)
    held = simulate(plan_of(ops, steps, waits=[Wait(1, 0)]), HW)
    assert times(free)[1] == ("d(0)@0", 0, 10) and times(held)[1] == ("d(0)@0", 10, 20)


def test_same_input_gives_identical_timeline():
    """Simulating the same plan twice gives equal timelines."""
    model = build_model("deepseek-v3", ParallelConfig(ep=16), num_layers=4)
    plan = build_plan("deepseek_prefill", model, split(Batch.prefill(4096), 2, split_requests=True))
    assert simulate(plan, "h800", comm_compute_share=0.3) == simulate(plan, "h800", comm_compute_share=0.3)


def test_sequential_exposes_all_comm_and_has_zero_efficiency():
    """The baseline against itself: eta 0, speed-up 1, every comm microsecond exposed."""
    model = build_model("deepseek-v3", ParallelConfig(ep=16), num_layers=4)
    tl = simulate(build_plan("sequential", model, split(Batch.prefill(4096), 1)), "910b2")
    m = metrics(tl, tl)
    assert (m.efficiency, m.speedup) == (0.0, 1.0)
    assert m.exposed_comm_s == pytest.approx(m.comm_total_s) and m.comm_total_s > 0


def test_bad_comm_share_is_refused():
    """comm_compute_share outside [0, 1] is a ConfigError naming the valid range."""
    plan = plan_of(compute_then_comm(), [(0, "attn", 0), (0, "dispatch", 1), (1, "attn", 0),
                                         (1, "dispatch", 1)])
    with pytest.raises(ConfigError, match=r"'comm_compute_share' must be in \[0, 1\] \(got 1.5\)"):
        simulate(plan, HW, comm_compute_share=1.5)


def test_bad_comm_mode_is_refused():
    """An unknown comm_mode lists the valid ones."""
    plan = plan_of(compute_then_comm(), [(0, "attn", 0), (0, "dispatch", 1), (1, "attn", 0),
                                         (1, "dispatch", 1)])
    with pytest.raises(ConfigError, match="'comm_mode' must be one of normal, low_latency"):
        simulate(plan, HW, comm_mode="fast")


def test_a_wait_cycle_is_reported_as_deadlock():
    """A plan whose extra wait points forward never finishes; the error names a stuck step."""
    plan = plan_of(compute_then_comm(), [(0, "attn", 0), (0, "dispatch", 1)], waits=[Wait(0, 1)])
    plan = Plan("hand", plan.model, split(Batch.prefill(1), 1), TWO, plan.steps, [0], [Wait(0, 1)])
    with pytest.raises(PlanError, match=r"plan 'hand' deadlocks: 2 step\(s\) never run, first: attn\(0\)@0"):
        simulate(plan, HW)


@settings(max_examples=25, deadline=None)
@given(graph=graphs(max_ops=8), strategy=st.sampled_from(sorted(NAMED)),
       hw=st.sampled_from([HW, ASCEND]), share=st.sampled_from([None, 0.0, 0.4]))
def test_random_plans_respect_dependencies_and_the_bound(graph, strategy, hw, share):
    """Every step starts after the steps it reads from end, and no plan beats its lower bound."""
    model = ModelGraph("m", [graph])
    try:
        plan = build_plan(strategy, model, split(Batch.prefill(64, 2), 2))
    except (ConfigError, PlanError):
        return  # not every strategy accepts every random graph
    tl = simulate(plan, hw, comm_compute_share=share)
    for i, deps in enumerate(plan.dependencies()):
        assert all(tl.spans[d].end <= tl.spans[i].start for d in deps), plan
    assert tl.makespan >= tl.bound_s * (1 - 1e-9)


def test_hook_based_collectives_hold_no_compute_units():
    """DeepEP's low-latency all-to-all frees every SM while in flight: with a 0.5 comm share,
    normal mode slows attn(1) (10 -> 15 µs) but low-latency mode does not (issue 10)."""
    hw = HW.evolve(low_latency_s=1e-6, low_latency_bw_factor=1.0)
    plan = plan_of(compute_then_comm(), [(0, "attn", 0), (0, "dispatch", 1), (1, "attn", 0),
                                         (1, "dispatch", 1)])
    assert times(simulate(plan, hw, comm_compute_share=0.5, comm_mode="low_latency")) == [
        ("attn(0)@0", 0, 10), ("dispatch(0)@0", 10, 20), ("attn(1)@0", 10, 20),
        ("dispatch(1)@0", 20, 30)]
    assert simulate(plan, hw, comm_compute_share=0.5).makespan == pytest.approx(35 * US)


def test_scale_corrects_ops_by_name_or_role():
    """Calibrated per-op factors: by name (attn x2: 20 µs) or role; the name wins over the role."""
    ops = [Op("attn", OpKind.COMPUTE, "x", "a", cost=matrix(10), role="attn"),
           a2a("dispatch", "a", "out", 10)]
    plan = plan_of(ops, [(0, "attn", 0), (0, "dispatch", 1)])
    assert times(simulate(plan, HW, scale={"attn": 2.0})) == [("attn(0)@0", 0, 20),
                                                              ("dispatch(0)@0", 20, 30)]
    plan = plan_of([Op("a0", OpKind.COMPUTE, "x", "out", cost=matrix(10), role="attn")],
                   [(0, "a0", 0)])
    assert simulate(plan, HW, scale={"attn": 0.5}).makespan == pytest.approx(5 * US)
    assert simulate(plan, HW, scale={"attn": 0.5, "a0": 3.0}).makespan == pytest.approx(30 * US)
    with pytest.raises(ConfigError, match=r"^scale factor for 'attn' must be a number > 0 \(got 0\)$"):
        simulate(plan, HW, scale={"attn": 0})
