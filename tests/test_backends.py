"""Each backend behind the protocol: what it issues, what it detects, where it refuses to run."""

from __future__ import annotations

import contextlib
import time
from types import SimpleNamespace

import attrs
import pytest

from overlap.backends import Backend, BackendUnavailableError, ExecutionError, Executor, get_backend
from overlap.backends.npu import NpuBackend, core_limits, torchair_scope
from overlap.backends.recording import RecordingBackend
from overlap.errors import ConfigError, MissingDependencyError
from overlap.ops_graph import Collective, Comm, Graph, ModelGraph, Op, OpKind
from overlap.plan import Batch, Plan, Stream, Wait, build_plan, split
from tests.timeouts import deadline


def produce_consume(slow_comm: bool = True) -> ModelGraph:
    """``x -> send (comm, slow) -> y -> use (compute) -> z``."""

    def send(x):
        if slow_comm:
            time.sleep(0.2)
        return [v + 1 for v in x]

    ops = [Op("send", OpKind.COMM, "x", "y", comm=Comm(Collective.ALL_TO_ALL, "ep", 2), role="dispatch"),
           Op("use", OpKind.COMPUTE, "y", "z", role="experts")]
    return ModelGraph("pc", [Graph("pc", ops, "x", "z").bind({"send": send, "use": lambda y: list(y)})])


class DroppedWaits(Plan):
    """A plan with its event waits removed, as a buggy strategy might produce (not validated)."""

    def waits(self) -> list[Wait]:
        return []


def test_the_threads_backend_exposes_a_missing_wait() -> None:
    """Without its wait, a step on another stream reads a value not yet written, and it is reported."""
    plan = build_plan("sglang_tbo", produce_consume(), split(Batch.prefill(4, 2), 2))
    broken = DroppedWaits(**{f.alias: getattr(plan, f.name) for f in attrs.fields(Plan) if f.init})
    assert plan.waits() and not broken.waits()
    with deadline(10), Executor(broken, "threads") as ex, pytest.raises(
            ExecutionError, match=r"^layer 0, microbatch 0, op 'use' failed: PlanError: value 'y' "
                                  r"\(layer 0, microbatch 0\) was read before it was written or after "
                                  r"it was freed: the plan is missing a wait$"):
        ex.run({"x": [1, 2, 3, 4]})


def test_the_threads_backend_honours_the_wait_it_was_given() -> None:
    """The same plan with its waits intact computes the right result on threads."""
    plan = build_plan("sglang_tbo", produce_consume(), split(Batch.prefill(4, 2), 2))
    with deadline(10), Executor(plan, "threads") as ex:
        assert ex.run({"x": [1, 2, 3, 4]}) == {"z": [2, 3, 4, 5]}


def test_recording_logs_the_plans_records_and_waits() -> None:
    """The recorded sequence has a record after each awaited step and a wait before each waiter."""
    plan = build_plan("sglang_tbo", produce_consume(slow_comm=False), split(Batch.prefill(4, 2), 2))
    backend = RecordingBackend()
    Executor(plan, backend).run({"x": [1, 2, 3, 4]})
    # From the plan, independently of the executor: send(m) on comm, then use(m) on compute waits.
    assert [s.label() for s in plan.steps] == ["send(0)@0", "send(1)@0", "use(0)@0", "use(1)@0"]
    assert backend.lines() == [
        "comm: submit send(0)@0", "comm: record e0",
        "comm: submit send(1)@0", "comm: record e1",
        "compute: wait e0", "compute: submit use(0)@0",
        "compute: wait e1", "compute: submit use(1)@0",
        "host: synchronize",
    ]


def test_recording_can_log_without_running() -> None:
    """With ``run=False`` nothing is called, so unbound-looking work is only logged."""
    calls = []
    backend = RecordingBackend(run=False)
    backend.submit("s", lambda: calls.append(1), "op(0)@0")
    assert calls == [] and backend.lines() == ["s: submit op(0)@0"]


@pytest.mark.parametrize("name", ["inline", "threads", "recording"])
def test_cpu_backends_implement_the_protocol(name: str) -> None:
    """Every CPU backend is a ``Backend``."""
    backend = get_backend(name)
    assert isinstance(backend, Backend) and backend.name == name
    backend.close()


def test_an_unknown_backend_lists_the_valid_ones() -> None:
    """A misspelt backend name is a ConfigError naming every backend."""
    with pytest.raises(ConfigError, match=r"^unknown backend 'cuda'; valid: inline, threads, "
                                          r"torch_streams, npu, recording$"):
        get_backend("cuda")


# -- torch_streams ---------------------------------------------------------------------------


def test_torch_streams_refuses_cpu_only_torch() -> None:
    """On torch without an accelerator the backend says so and points to the CPU backends."""
    torch = pytest.importorskip("torch")
    if torch.accelerator.is_available():
        pytest.skip(f"an accelerator is present: {torch.accelerator.current_accelerator()}")
    with pytest.raises(BackendUnavailableError, match=r"^backend 'torch_streams' needs an accelerator "
                                                      r"\(CUDA, NPU, XPU, \.\.\.\), but torch .* reports "
                                                      r"none through torch.accelerator; on CPU use "
                                                      r"backend 'threads' or 'inline'$"):
        get_backend("torch_streams")


def accelerator_torch():
    torch = pytest.importorskip("torch")
    if not torch.accelerator.is_available():
        pytest.skip("no accelerator: torch.accelerator.is_available() is False")
    return torch


def test_torch_streams_matches_inline_on_the_accelerator() -> None:
    """On a real accelerator, an overlapped plan gives the inline result bit for bit."""
    torch = accelerator_torch()
    dev = torch.accelerator.current_accelerator()
    model = produce_consume(slow_comm=False)
    model = ModelGraph("pc", [model.layers[0].bind({"send": lambda x: x * 2 + 1, "use": lambda y: y - 3})])
    plan = build_plan("sglang_tbo", model, split(Batch.prefill(64, 2), 2))
    x = torch.arange(64 * 32, device=dev).reshape(64, 32)
    with Executor(plan, "torch_streams") as ex:
        out = ex.run({"x": x})
    assert torch.equal(out["z"], Executor(plan).run({"x": x})["z"])


# -- npu, with fakes (torch-npu cannot run here) ---------------------------------------------


class FakeStream:
    def __init__(self, device=None):
        self.device = device

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def fake_torch(*, limits: bool = True, log: list | None = None):
    """Just enough of torch + torch-npu for NpuBackend's own logic."""
    log = [] if log is None else log
    npu = SimpleNamespace()
    if limits:
        npu.get_device_limit = lambda index: {"cube_core_num": 24, "vector_core_num": 48}
        npu.set_stream_limit = lambda stream, cube, vector: log.append(("limit", cube, vector))
    accelerator = SimpleNamespace(is_available=lambda: True,
                                  current_accelerator=lambda: SimpleNamespace(type="npu"),
                                  current_device_index=lambda: 0)
    return SimpleNamespace(__version__="fake", accelerator=accelerator, npu=npu, Stream=FakeStream,
                           device=lambda kind, index=None: SimpleNamespace(type=kind, index=index))


def test_core_limits_are_the_streams_share_of_each_core_kind() -> None:
    """A 0.25 share of 24 cube and 48 vector cores is 6 and 12; no share means no limit."""
    assert core_limits(0.25, 24, 48) == (6, 12)
    assert core_limits(0.01, 24, 48) == (1, 1)
    assert core_limits(None, 24, 48) is None


def test_a_share_outside_0_1_is_refused() -> None:
    """A stream share must be a fraction of the device."""
    with pytest.raises(ConfigError, match=r"^stream 'share' must be in \(0, 1\] \(got 1.5\)$"):
        core_limits(1.5, 24, 48)


def test_npu_sets_a_core_limit_for_streams_with_a_share() -> None:
    """Only streams with a ``share`` get ``set_stream_limit`` (here: half the cores)."""
    log: list = []
    backend = NpuBackend(torch=fake_torch(log=log), torch_npu=SimpleNamespace())
    backend.make_stream(Stream("compute", "compute", share=0.5))
    backend.make_stream(Stream("comm", "comm"))
    assert log == [("limit", 12, 24)]
    assert backend.limits == {"compute": (12, 24)}


def test_npu_without_stream_limits_runs_unlimited_and_says_so() -> None:
    """An older torch-npu without ``set_stream_limit`` skips limits and lists what it skipped."""
    backend = NpuBackend(torch=fake_torch(limits=False), torch_npu=SimpleNamespace())
    backend.make_stream(Stream("compute", "compute", share=0.5))
    assert backend.skipped == ["compute: torch.npu.set_stream_limit is not available"]


def test_npu_graph_mode_tags_every_stream_but_the_first() -> None:
    """In graph mode ops of later streams run inside ``npu_stream_switch(tag, priority)``."""
    switched = []

    @contextlib.contextmanager
    def switch(tag, priority):
        switched.append((tag, priority))
        yield

    backend = NpuBackend(graph_mode=True, torch=fake_torch(), torch_npu=SimpleNamespace(),
                         torchair=(switch, None))
    plan = build_plan("sglang_tbo", produce_consume(slow_comm=False), split(Batch.prefill(4, 2), 2))
    assert Executor(plan, backend).run({"x": [1, 2, 3, 4]}) == {"z": [2, 3, 4, 5]}
    assert switched == [("overlap_comm", 0), ("overlap_comm", 0)]  # the two sends


def test_npu_graph_mode_refuses_explicit_waits() -> None:
    """A wait with no data edge cannot be expressed in a captured graph, so the plan is refused."""
    plan = build_plan("sglang_tbo", produce_consume(slow_comm=False), split(Batch.prefill(4, 2), 2))
    plan = attrs.evolve(plan, extra_waits=[Wait(1, 0)])  # send(1) after send(0): same stream, no data
    backend = NpuBackend(graph_mode=True, torch=fake_torch(), torch_npu=SimpleNamespace(),
                         torchair=(None, None))
    with pytest.raises(ConfigError, match=r"^backend 'npu' orders streams by data dependencies only, "
                                          r"but plan 'sglang_tbo' has 1 explicit wait\(s\) "
                                          r"\(send\(1\)@0 after send\(0\)@0\)$"):
        Executor(plan, backend)


def test_torchair_ops_are_found_in_the_older_module() -> None:
    """Without ``torchair.scope`` the stream switch comes from ``torchair.ops``."""
    ops = SimpleNamespace(NpuStreamSwitch="switch", npu_wait_tensor="wait")

    def module(name):
        if name == "torchair.ops":
            return ops
        raise ImportError(name)

    assert torchair_scope(module) == ("switch", "wait")


def test_graph_mode_without_torchair_says_what_to_install() -> None:
    """No torchair at all is a BackendUnavailableError naming it."""

    def module(name):
        raise ImportError(name)

    with pytest.raises(BackendUnavailableError, match=r"^backend 'npu' with graph_mode=True needs "
                                                      r"torchair \(torchair.scope.npu_stream_switch "):
        torchair_scope(module)


def test_npu_without_torch_npu_names_the_extra() -> None:
    """Asking for the npu backend without torch-npu installed names the ``npu`` extra."""
    pytest.importorskip("torch")
    with pytest.raises(MissingDependencyError, match=r"^the 'npu' backend needs the optional "
                                                     r"dependency 'torch_npu', which is not installed; "
                                                     r"install it with: pip install "
                                                     r"'microbatch-overlap\[npu\]'$"):
        get_backend("npu")
