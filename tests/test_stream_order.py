"""torch_streams / npu step ordering, with fakes (no accelerator here): the plan's streams wait
on the caller's current stream at entry, and the caller's stream waits on them at exit, with no
host synchronisation per step."""

from __future__ import annotations

from types import SimpleNamespace

from overlap.backends import Executor
from overlap.backends.npu import NpuBackend
from overlap.backends.torch_streams import TorchStreamsBackend
from overlap.plan import Batch, build_plan, split
from tests.test_backends import produce_consume


class Stream:
    """A fake device stream that logs what is issued to it (and whether the host blocked)."""

    count = 0

    def __init__(self, log: list, name: str | None = None, device: object = None) -> None:
        Stream.count += 1
        self.log, self.name = log, name or f"s{Stream.count}"

    def __enter__(self) -> Stream:
        self.log.append(("enter", self.name))
        return self

    def __exit__(self, *exc: object) -> bool:
        return False

    def wait_event(self, event: Event) -> None:
        self.log.append(("wait", self.name, event.stream.name))

    def synchronize(self) -> None:
        self.log.append(("host_sync", self.name))


class Event:
    def __init__(self, device: object = None) -> None:
        self.stream: Stream | None = None

    def record(self, stream: Stream) -> None:
        self.stream = stream

    def synchronize(self) -> None:
        self.stream.log.append(("host_sync_event", self.stream.name))


def fake_torch(log: list) -> SimpleNamespace:
    caller = Stream(log, "caller")
    accelerator = SimpleNamespace(is_available=lambda: True,
                                  current_accelerator=lambda: SimpleNamespace(type="cuda"),
                                  current_device_index=lambda: 0,
                                  current_stream=lambda device=None: caller)
    return SimpleNamespace(__version__="fake", accelerator=accelerator, Event=Event, npu=None,
                           Stream=lambda device=None: Stream(log, device=device),
                           Tensor=type("Tensor", (), {}),
                           device=lambda kind, index=None: SimpleNamespace(type=kind, index=index))


def _plan():
    return build_plan("sglang_tbo", produce_consume(slow_comm=False), split(Batch.prefill(4, 2), 2))


def _run(backend: TorchStreamsBackend, log: list, steps: int = 1) -> list[list]:
    executor = Executor(_plan(), backend)
    out = []
    for _ in range(steps):
        log.clear()
        assert executor.run({"x": [1, 2, 3, 4]}) == {"z": [2, 3, 4, 5]}
        out.append(list(log))
    return out


def test_each_stream_waits_on_the_caller_before_its_first_work() -> None:
    """Every plan stream's first action in a step is a wait on the caller's stream."""
    log: list = []
    backend = TorchStreamsBackend(torch=fake_torch(log))
    for step in _run(backend, log, steps=2):  # and again in the next step
        streams = [h.name for h in backend.streams]
        for name in streams:
            first = next(e for e in step if e[1] == name)
            assert first == ("wait", name, "caller"), step
        assert sum(e == ("wait", n, "caller") for e in step for n in streams) == len(streams)


def test_the_host_does_not_synchronise_each_step() -> None:
    """No host-blocking call in a step; the caller's stream waits on each used stream last."""
    log: list = []
    backend = TorchStreamsBackend(torch=fake_torch(log))
    (step,) = _run(backend, log)
    assert not [e for e in step if e[0].startswith("host_sync")], step
    used = {e[1] for e in step if e[0] == "enter"}
    tail = step[-len(used):]
    assert sorted(tail) == sorted(("wait", "caller", name) for name in used)


def test_host_sync_option_and_close_block_the_host() -> None:
    """``host_sync=True`` blocks on every stream per step; close always blocks."""
    log: list = []
    backend = TorchStreamsBackend(torch=fake_torch(log), host_sync=True)
    (step,) = _run(backend, log)
    assert {e for e in step if e[0] == "host_sync"} == {("host_sync", h.name)
                                                         for h in backend.streams}
    log.clear()
    streams = [h.name for h in backend.streams]
    backend.close()
    assert [e for e in log if e[0] == "host_sync"] == [("host_sync", n) for n in streams]


def test_npu_streams_order_against_the_caller_too() -> None:
    """The npu backend (runtime streams) inherits the entry wait and the device-side exit."""
    log: list = []
    torch = fake_torch(log)
    torch.npu = SimpleNamespace()
    torch.accelerator.current_accelerator = lambda: SimpleNamespace(type="npu")
    backend = NpuBackend(torch=torch, torch_npu=SimpleNamespace())
    (step,) = _run(backend, log)
    assert not [e for e in step if e[0].startswith("host_sync")]
    assert ("wait", backend.streams[0].name, "caller") in step
