"""Executor(record=True): a real run leaves the same Timeline the simulator predicts."""

from __future__ import annotations

import itertools
import statistics
import time
from types import SimpleNamespace

import pytest

from overlap.backends import Executor
from overlap.backends.inline import InlineBackend
from overlap.backends.npu import NpuBackend
from overlap.backends.simulated import simulate
from overlap.backends.timeline import Timeline
from overlap.cost.calibrate import fit, measurements
from overlap.errors import ConfigError
from overlap.ops_graph import Collective, Comm, Graph, ModelGraph, Op, OpKind
from overlap.plan import Batch, build_plan, split
from overlap.report import chrome_trace, metrics
from tests.timeouts import deadline


def two_layer_model(sleep_s: float = 0.0) -> ModelGraph:
    """Per layer ``x -> send (comm) -> y -> use (compute) -> x``; ops sleep to take real time."""

    def send(x):
        time.sleep(sleep_s)
        return [v + 1 for v in x]

    def use(y):
        time.sleep(sleep_s)
        return list(y)

    ops = [Op("send", OpKind.COMM, "x", "y", comm=Comm(Collective.ALL_TO_ALL, "ep", 2), role="dispatch"),
           Op("use", OpKind.COMPUTE, "y", "z", role="experts")]
    layer = Graph("pc", ops, "x", "z").bind({"send": send, "use": use})
    return ModelGraph("pc", [layer, layer])


def check_causal(plan, tl: Timeline) -> None:
    """What any real run obeys: a stream runs its steps one at a time in issue order, and a step
    starts after every step it depends on has ended."""
    assert len(tl.spans) == len(plan.steps)
    for step, span in zip(plan.steps, tl.spans):
        assert (span.layer, span.micro, span.op, span.stream) == (step.layer, step.micro, step.op,
                                                                   step.stream)
        assert 0 <= span.start <= span.end
    for stream in range(len(plan.streams)):
        mine = tl.on_stream(stream)
        assert all(a.end <= b.start for a, b in itertools.pairwise(mine))
    for waiter, ons in enumerate(plan.dependencies()):
        for on in ons:
            assert tl.spans[on].end <= tl.spans[waiter].start


@pytest.mark.parametrize("backend", ["inline", "threads"])
def test_a_recorded_run_gives_one_span_per_step_in_causal_order(backend: str) -> None:
    """Host clock: every (layer, microbatch, op) is one span, ordered as the plan demands."""
    plan = build_plan("sglang_tbo", two_layer_model(0.002), split(Batch.prefill(4, 2), 2))
    with deadline(20), Executor(plan, backend, record=True) as ex:
        assert ex.timeline is None
        assert ex.run({"x": [1, 2, 3, 4]}) == {"z": [3, 4, 5, 6]}
        tl = ex.timeline
    assert tl.measured and tl.bound_s is None and tl.strategy == "sglang_tbo"
    assert tl.streams == tuple(s.name for s in plan.streams)
    assert [s.kind for s in tl.spans] == [plan.model.layers[s.layer][s.op].kind.value for s in plan.steps]
    assert all(s.duration >= 0.002 for s in tl.spans)  # each op sleeps 2 ms
    check_causal(plan, tl)


def test_the_inline_backend_runs_steps_back_to_back_in_issue_order() -> None:
    """Inline runs on one thread, so spans follow the step order and never overlap."""
    plan = build_plan("sglang_tbo", two_layer_model(), split(Batch.prefill(4, 2), 2))
    ex = Executor(plan, "inline", record=True)
    ex.run({"x": [1, 2, 3, 4]})
    spans = ex.timeline.spans
    assert all(a.end <= b.start for a, b in itertools.pairwise(spans))


def test_recording_is_off_by_default_and_each_run_replaces_the_timeline() -> None:
    """No timeline without ``record``; with it, the latest run's timeline (a new object)."""
    plan = build_plan("sglang_tbo", two_layer_model(), split(Batch.prefill(4, 2), 2))
    assert Executor(plan).run({"x": [1, 2, 3, 4]}) and Executor(plan).timeline is None
    ex = Executor(plan, record=True)
    ex.run({"x": [1, 2, 3, 4]})
    first = ex.timeline
    ex.run({"x": [5, 6, 7, 8]})
    assert ex.timeline is not first and len(ex.timeline.spans) == len(first.spans)


class DeviceClockBackend(InlineBackend):
    """Inline execution with fake device timing events: an event is the fake clock's reading
    when it is recorded, and every op advances that clock by 1 ms (as a device would run it)."""

    name = "fake-device"
    device = "fake:0"

    def __init__(self) -> None:
        self.now = 10.0  # the device clock's own origin is arbitrary
        self.marks = 0

    def timing_event(self, handle):
        self.marks += 1
        return self.now

    def elapsed_s(self, start, end):
        return end - start

    def submit(self, handle, fn, label):
        fn()
        self.now += 1e-3


def test_backends_with_timing_events_are_timed_by_device_events() -> None:
    """With ``timing_event``/``elapsed_s`` the spans are device-clock differences from the run's
    origin event: op k (0-based, in step order) spans [k, k+1] ms here."""
    plan = build_plan("sglang_tbo", two_layer_model(), split(Batch.prefill(4, 2), 2))
    backend = DeviceClockBackend()
    ex = Executor(plan, backend, record=True)
    ex.run({"x": [1, 2, 3, 4]})
    n = len(plan.steps)
    assert backend.marks == 1 + 2 * n  # one origin, two per step
    assert [(round(s.start * 1e3, 9), round(s.end * 1e3, 9)) for s in ex.timeline.spans] == [
        (k, k + 1) for k in range(n)]
    assert ex.timeline.device == "fake:0"


def test_graph_mode_cannot_be_recorded() -> None:
    """A captured graph has no per-op boundaries to time: one clear error, at construction."""
    from tests.test_backends import fake_torch

    plan = build_plan("sequential", two_layer_model(), split(Batch.prefill(4, 2), 2))
    backend = NpuBackend(graph_mode=True, torch=fake_torch(), torch_npu=SimpleNamespace(),
                         torchair=(None, None))
    with pytest.raises(ConfigError, match=r"^backend 'npu' captures a graph: its ops cannot be timed"):
        Executor(plan, backend, record=True)


def test_reports_and_calibration_read_a_measured_timeline() -> None:
    """Metrics and the Perfetto trace work on a measured run, and calibration fits directly
    from it: measuring exactly the simulated durations gives factors of 1."""
    plan = build_plan("sglang_tbo", two_layer_model(0.001), split(Batch.prefill(4, 2), 2))
    with deadline(20), Executor(plan, "threads", record=True) as ex:
        ex.run({"x": [1, 2, 3, 4]})
    tl = ex.timeline
    m = metrics(tl)
    assert m.step_s == pytest.approx(tl.makespan) and m.comm_total_s > 0
    assert sum(e["ph"] == "X" for e in chrome_trace(tl)["traceEvents"]) == len(plan.steps)
    got = measurements(tl)
    assert {(g.name, g.kind) for g in got} == {("send", "comm"), ("use", "compute")}
    median = {n: statistics.median(g.duration_s for g in got if g.name == n) for n in ("send", "use")}
    cal = fit({"send": ("comm", 2 * median["send"]), "use": ("compute", 2 * median["use"])}, got)
    assert (cal.compute, cal.comm) == (pytest.approx(0.5), pytest.approx(0.5))  # predicted 2x slow
    sim = simulate(plan, "h100")
    cal = fit({s.op: (s.kind, s.duration) for s in sim.spans}, measurements(sim))
    assert cal.compute == pytest.approx(1.0) and cal.comm == pytest.approx(1.0)


def test_torch_streams_times_with_timing_events_on_the_steps_stream() -> None:
    """``torch_streams`` asks torch for ``Event(enable_timing=True)`` recorded on the step's
    stream and converts ``elapsed_time`` (milliseconds) to seconds (fake torch: no device here)."""
    from overlap.backends.torch_streams import TorchStreamsBackend

    clock = [0.0]
    recorded = []

    class Event:
        def __init__(self, device=None, enable_timing=False):
            self.timing = enable_timing

        def record(self, stream):
            recorded.append((stream.name, self.timing))
            self.at = clock[0]

        def elapsed_time(self, end):
            return (end.at - self.at) * 1e3

        def synchronize(self):
            pass

    class Stream:
        def __init__(self, device=None):
            self.name = f"s{len(streams)}"
            streams.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            clock[0] += 0.5  # each op "runs" 0.5 s on the fake device
            return False

        def wait_event(self, event):
            pass

        def synchronize(self):
            pass

    streams: list = []
    accelerator = SimpleNamespace(is_available=lambda: True,
                                  current_accelerator=lambda: SimpleNamespace(type="cuda"),
                                  current_device_index=lambda: 0,
                                  current_stream=lambda device=None: caller)
    caller = SimpleNamespace(name="caller", wait_event=lambda event: None)
    torch = SimpleNamespace(__version__="fake", accelerator=accelerator, Stream=Stream, Event=Event,
                            Tensor=type("Tensor", (), {}),
                            device=lambda kind, index=None: SimpleNamespace(type=kind, index=index))
    plan = build_plan("sglang_tbo", two_layer_model(), split(Batch.prefill(4, 2), 2))
    ex = Executor(plan, TorchStreamsBackend(torch=torch), record=True)
    ex.run({"x": [1, 2, 3, 4]})
    assert [(s.start, s.end) for s in ex.timeline.spans] == [(0.5 * k, 0.5 * k + 0.5)
                                                            for k in range(len(plan.steps))]
    timed = [r for r in recorded if r[1]]
    assert len(timed) == 1 + 2 * len(plan.steps)  # the origin, then before and after each step
    comm = plan.streams.index(next(s for s in plan.streams if s.kind == "comm"))
    assert timed[1] == (f"s{comm}", True)  # the first step (a send) is timed on the comm stream


def test_recording_issues_exactly_what_an_unrecorded_run_issues():
    """Host-clock recording only wraps the op calls: the backend sees the same submits, records
    and waits in the same order, and the outputs are the same."""
    from overlap.backends.recording import RecordingBackend

    plan = build_plan("sglang_tbo", two_layer_model(), split(Batch.prefill(4, 2), 2))
    logs = []
    for record in (False, True):
        backend = RecordingBackend()
        assert Executor(plan, backend, record=record).run({"x": [1, 2, 3, 4]}) == {"z": [3, 4, 5, 6]}
        logs.append(backend.lines())
    assert logs[0] == logs[1]
