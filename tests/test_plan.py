"""The Plan value: printing, JSON round trip, derived events, cross-layer slots."""

from __future__ import annotations

import attrs
import pytest

from overlap.ops_graph import Collective, Comm, Graph, ModelGraph, Op, OpKind
from overlap.plan import Batch, Plan, Wait, build_plan, split

C, M = OpKind.COMPUTE, OpKind.COMM
A2A = Comm(Collective.ALL_TO_ALL, "ep", 2)
LAYER = Graph("moe", [
    Op("attn", C, "h", "a", role="attn"),
    Op("gate", C, "a", ("x", "t"), role="gate"),
    Op("dispatch", M, ("x", "t"), "r", comm=A2A, role="dispatch"),
    Op("experts", C, "r", "e", role="experts"),
    Op("combine", M, "e", "c", comm=A2A, role="combine"),
    Op("shared", C, "x", "s", role="shared"),
    Op("merge", C, ("c", "s"), "out", role="merge"),
], "h", "out")
TWO = ModelGraph("tiny", [LAYER, LAYER])

PINNED = """\
plan deepseek_prefill: 2 microbatches (4 + 4 tokens), 2 layers, streams compute, comm; * waits for an event
prologue (slot 0, layer L=0):
  compute           comm
  attn(0)
  gate(0)
                    *dispatch(0)
  attn(1)
  gate(1)
                    *dispatch(1)
  *experts(0)
                    *combine(0)
  *experts(1)
                    *combine(1)
  shared(0)
  *merge(0)
last layer (slot 1, layer L=1):
  compute           comm
  attn(0)
  gate(0)
                    *dispatch(0)
  shared(1) L-1
  *merge(1) L-1
  attn(1)
  gate(1)
                    *dispatch(1)
  *experts(0)
                    *combine(0)
  *experts(1)
                    *combine(1)
  shared(0)
  *merge(0)
epilogue (slot 2):
  compute           comm
  shared(1) L-1
  *merge(1) L-1"""


def _plan(name="deepseek_prefill", model=TWO, n=2) -> Plan:
    return build_plan(name, model, split(Batch.prefill(8, 2), n))


def test_print_shows_the_stream_timeline():
    """print(plan) draws prologue, cross-layer slot and epilogue lane by lane."""
    assert str(_plan()) == PINNED


def test_print_without_epilogue_labels_slots_by_layer():
    """A plan with no tail slot shows prologue, steady state and last layer, nothing twice."""
    plan = _plan("sequential", ModelGraph("tiny", [LAYER] * 3))
    assert [t for _, t in plan.shown_slots()] == [
        "prologue (slot 0, layer L=0)", "steady state (slot 1, layer L=1)",
        "last layer (slot 2, layer L=2)"]


def test_print_of_one_slot_plan_says_only_slot():
    """A one-layer plan without epilogue has a single slot, titled as such."""
    plan = _plan("sequential", ModelGraph("tiny", [LAYER]))
    assert [t for _, t in plan.shown_slots()] == ["only slot (slot 0, layer L=0)"]


def test_json_round_trip_gives_an_equal_plan():
    """A plan read back from its JSON equals the original and derives the same events."""
    plan = _plan()
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.waits() == plan.waits()
    assert str(again) == str(plan)


def test_plan_is_immutable():
    """A plan cannot be changed after it is built."""
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        _plan().steps = ()


def test_waits_are_the_cross_stream_dependencies():
    """Dispatch waits for the gate (compute -> comm); the gate does not wait for attention."""
    plan = _plan()
    at = plan.index()
    waits = set(plan.waits())
    assert Wait(at[0, 0, "dispatch"], at[0, 0, "gate"]) in waits
    assert Wait(at[0, 0, "experts"], at[0, 0, "dispatch"]) in waits
    assert not any(w.waiter == at[0, 0, "gate"] for w in waits)
    assert plan.recorded() == frozenset(w.on for w in waits)


def test_next_layer_reads_the_previous_layers_output():
    """Layer 1's attention of microbatch 1 depends on layer 0's merge of microbatch 1."""
    plan = _plan()
    at = plan.index()
    assert at[0, 1, "merge"] in plan.dependencies()[at[1, 1, "attn"]]


def test_cut_request_adds_the_kv_cache_dependency():
    """When microbatch 1 continues microbatch 0's request, its attention waits for 0's."""
    plan = build_plan("deepseek_prefill", TWO, split(Batch.prefill(8), 2, split_requests=True))
    at = plan.index()
    assert at[0, 0, "attn"] in plan.dependencies()[at[0, 1, "attn"]]


def test_unsplit_requests_have_no_kv_dependency():
    """Whole requests in each microbatch do not make attention depend across microbatches."""
    plan = _plan()
    at = plan.index()
    assert at[0, 0, "attn"] not in plan.dependencies()[at[0, 1, "attn"]]
