"""An op that raises surfaces as one ExecutionError; nothing hangs and the executor runs again."""

from __future__ import annotations

import threading
import time

import pytest

from overlap.backends import ExecutionError, Executor
from overlap.ops_graph import Collective, Comm, Graph, ModelGraph, Op, OpKind
from overlap.plan import Batch, build_plan, split
from tests.timeouts import deadline

BACKENDS = ("inline", "threads")


def moe_model(experts, layers: int = 3) -> ModelGraph:
    """attn -> dispatch (comm) -> experts -> combine (comm), with slow collectives."""

    def slow(v):
        time.sleep(0.005)
        return list(v)

    ep = Comm(Collective.ALL_TO_ALL, "ep", 4)
    ops = [Op("attn", OpKind.COMPUTE, "x", "h", role="attn"),
           Op("dispatch", OpKind.COMM, "h", "recv", comm=ep, role="dispatch"),
           Op("experts", OpKind.COMPUTE, "recv", "out", role="experts"),
           Op("combine", OpKind.COMM, "out", "y", comm=ep, role="combine")]
    graph = Graph("moe", ops, "x", "y").bind(
        {"attn": lambda x: [v + 1 for v in x], "dispatch": slow, "experts": experts, "combine": slow})
    return ModelGraph("moe", [graph] * layers)


def failing_at(layer: int, micro: int):
    """An experts callable that raises on one (layer, microbatch), counted by call order."""
    calls = {"n": 0}

    def experts(v):
        k = calls["n"]
        calls["n"] += 1
        if (k // 2, k % 2) == (layer, micro):
            raise ValueError("boom")
        return [2 * x for x in v]

    return experts


def plan_of(model: ModelGraph):
    return build_plan("sglang_tbo", model, split(Batch.prefill(8, 2), 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_op_failure_names_layer_microbatch_and_op(backend: str) -> None:
    """The error says where it happened and keeps the op's exception as its cause."""
    model = moe_model(lambda v: 1 / 0 if v[0] > 100 else [2 * x for x in v])
    with deadline(10), Executor(plan_of(model), backend) as ex, pytest.raises(
            ExecutionError, match=r"^layer 0, microbatch 1, op 'experts' failed: "
                                  r"ZeroDivisionError: division by zero$") as info:
        ex.run({"x": [1, 2, 3, 4, 200, 201, 202, 203]})
    assert (info.value.layer, info.value.micro, info.value.op) == (0, 1, "experts")
    assert isinstance(info.value.cause, ZeroDivisionError)


def test_threads_are_joined_after_a_failure() -> None:
    """After a failed run no worker thread is left running."""
    baseline = threading.active_count()
    ex = Executor(plan_of(moe_model(failing_at(1, 0))), "threads")
    with deadline(10), pytest.raises(ExecutionError, match=r"^layer 1, microbatch 0, op 'experts' failed"):
        ex.run({"x": list(range(8))})
    assert threading.active_count() == baseline


def test_threads_are_joined_on_close() -> None:
    """Closing an executor that owns a threads backend stops its workers."""
    baseline = threading.active_count()
    with deadline(10), Executor(plan_of(moe_model(lambda v: list(v))), "threads") as ex:
        ex.run({"x": list(range(8))})
        assert threading.active_count() > baseline
    assert threading.active_count() == baseline


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_executor_runs_again_after_a_failure(backend: str) -> None:
    """A failed run leaves nothing behind: the next run on the same executor succeeds."""
    fail = {"on": True}

    def experts(v):
        if fail["on"]:
            raise RuntimeError("transient")
        return [2 * x for x in v]

    with deadline(10), Executor(plan_of(moe_model(experts)), backend) as ex:
        with pytest.raises(ExecutionError, match=r"^layer 0, microbatch 0, op 'experts' failed: "
                                                 r"RuntimeError: transient$"):
            ex.run({"x": list(range(8))})
        fail["on"] = False
        # three layers of attn(+1) then experts(x2): ((x+1)*2+1)*2+1)*2
        assert ex.run({"x": [0, 1, 2, 3, 4, 5, 6, 7]}) == {
            "y": [(((x + 1) * 2 + 1) * 2 + 1) * 2 for x in range(8)]}


def test_a_failure_while_another_stream_waits_does_not_hang() -> None:
    """A stream waiting for an event of a stream whose op failed is released, not stuck."""

    def experts(v):
        time.sleep(0.02)  # the comm stream is already waiting for this step's event
        raise ValueError("late")

    baseline = threading.active_count()
    with deadline(10), Executor(plan_of(moe_model(experts)), "threads") as ex, pytest.raises(
            ExecutionError, match=r"^layer 0, microbatch 0, op 'experts' failed: ValueError: late$"):
        ex.run({"x": list(range(8))})
    assert threading.active_count() == baseline


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_first_failure_is_reported(backend: str) -> None:
    """When several microbatches would fail, one ExecutionError (the first) is raised."""

    def experts(v):
        raise KeyError(v[0])

    with deadline(10), Executor(plan_of(moe_model(experts)), backend) as ex, pytest.raises(
            ExecutionError, match=r"^layer 0, microbatch 0, op 'experts' failed: KeyError: 1$"):
        ex.run({"x": list(range(8))})


def test_a_wrong_number_of_results_is_an_execution_error() -> None:
    """An op returning fewer values than it writes is reported like any op failure."""
    graph = Graph("two", [Op("pair", OpKind.COMPUTE, "x", ("a", "b"))], "x", ("a", "b"))
    model = ModelGraph("two", [graph.bind({"pair": lambda x: (x,)})])
    plan = build_plan("sequential", model, split(Batch.prefill(2, 1), 1))
    with pytest.raises(ExecutionError, match=r"^layer 0, microbatch 0, op 'pair' failed: ValueError: "
                                             r"returned 1 values but the op writes 2$"):
        Executor(plan).run({"x": [1, 2]})
