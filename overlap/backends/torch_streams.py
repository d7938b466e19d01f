"""The ``torch_streams`` backend: plan streams as ``torch.Stream``, events as ``torch.Event``.

Device-generic through ``torch.accelerator``: it runs on whatever accelerator torch reports —
CUDA, Ascend NPU (torch-npu registers ``npu``), XPU — with no per-vendor code. Each submitted op
runs on the host with its stream made current, so its kernels are queued there; ``record`` and
``wait`` become ``Event.record(stream)`` and ``stream.wait_event(event)``. A tensor read on a
stream other than the one that made it is marked with ``record_stream`` so the caching allocator
does not hand its memory out again while that stream may still read it.

A step is ordered against the caller on the device, not on the host. Before a plan stream's
first work of a step it waits on an event recorded on the caller's current stream (so it sees
the inputs the caller queued, e.g. the embedding), and at the end of the step
(:meth:`synchronize`) the caller's current stream waits on every stream the step used: the host
returns without blocking, and whatever the caller queues next runs after the step. Memory a
step's outputs free back to a plan stream's pool is only written again by a later step's work,
which waits on the caller's stream first. ``host_sync=True`` restores a blocking host wait per
step (for debugging); :meth:`close` always blocks.

On CPU-only torch there is no accelerator and construction fails with a clear message; use the
``threads`` or ``inline`` backend there.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from types import ModuleType
from typing import Any

from overlap._optional import require
from overlap.backends.executor import BackendUnavailableError
from overlap.plan.plan import Stream


def accelerator_device(torch: ModuleType, device: Any = None) -> Any:
    """The ``torch.device`` to run on: ``device`` if given, else the current accelerator's.

    Raises :class:`BackendUnavailableError` when torch reports no accelerator, or when ``device``
    is not of the accelerator's type.
    """
    acc = getattr(torch, "accelerator", None)
    if acc is None or not acc.is_available():
        raise BackendUnavailableError(
            f"backend 'torch_streams' needs an accelerator (CUDA, NPU, XPU, ...), but torch "
            f"{torch.__version__} reports none through torch.accelerator; on CPU use backend "
            "'threads' or 'inline'")
    kind = acc.current_accelerator().type
    if device is None:
        return torch.device(kind, acc.current_device_index())
    dev = torch.device(device)
    if dev.type != kind:
        raise BackendUnavailableError(
            f"backend 'torch_streams': device {str(dev)!r} is not the accelerator torch reports "
            f"({kind!r})")
    return dev


class TorchStreamsBackend:
    """Plan streams on the accelerator torch reports.

    device:   where to create the streams (default: the current accelerator device).
    annotate: wrap every op in ``torch.profiler.record_function(label)`` so profiler traces name
              the step (costs a few microseconds per op).
    host_sync: block the host at the end of every step (default: order on the device only).
    torch:    the torch module to use; tests pass a fake.
    """

    name = "torch_streams"

    def __init__(self, device: Any = None, *, annotate: bool = False, host_sync: bool = False,
                 torch: ModuleType | None = None) -> None:
        self.torch = torch or require("torch", purpose="the 'torch_streams' backend")
        self.device = accelerator_device(self.torch, device)
        self.annotate = annotate
        self.host_sync = host_sync
        self.streams: list[Any] = []
        self._entry: Any = None  # the caller's event this step's streams wait on
        self._entered: dict[int, Any] = {}  # id -> stream, the streams this step has used

    def _caller(self) -> Any:
        return self.torch.accelerator.current_stream(self.device)

    def _enter(self, handle: Any) -> None:
        """On a stream's first use in a step: make it wait for the caller's queued work."""
        if id(handle) in self._entered:
            return
        if self._entry is None:
            self._entry = self.torch.Event(device=self.device)
            self._entry.record(self._caller())
        handle.wait_event(self._entry)
        self._entered[id(handle)] = handle

    def make_stream(self, stream: Stream) -> Any:
        handle = self.torch.Stream(device=self.device)
        self.streams.append(handle)
        return handle

    def submit(self, handle: Any, fn: Callable[[], None], label: str) -> None:
        self._enter(handle)
        scope = self.torch.profiler.record_function(label) if self.annotate else nullcontext()
        with handle, scope:
            fn()

    def record(self, handle: Any) -> Any:
        self._enter(handle)
        event = self.torch.Event(device=self.device)
        event.record(handle)
        return event

    def wait(self, handle: Any, event: Any) -> None:
        self._enter(handle)
        handle.wait_event(event)

    def timing_event(self, handle: Any) -> Any:
        """A timing event recorded now on ``handle`` (used by ``Executor(record=True)``)."""
        self._enter(handle)
        event = self.torch.Event(device=self.device, enable_timing=True)
        event.record(handle)
        return event

    def elapsed_s(self, start: Any, end: Any) -> float:
        """Seconds between two timing events (torch reports milliseconds). The step ends without
        a host wait, so this waits for ``end`` first (recorded runs only)."""
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def host_wait(self, event: Any) -> None:
        event.synchronize()

    def use(self, handle: Any, value: Any) -> None:
        """Keep ``value``'s memory reserved until work now queued on ``handle`` has run."""
        if isinstance(value, self.torch.Tensor) and value.device.type == self.device.type:
            value.record_stream(handle)

    def synchronize(self) -> None:
        """End the step: the caller's current stream waits on every stream the step used (the
        host only blocks with ``host_sync``)."""
        entered, self._entered, self._entry = self._entered, {}, None
        if self.host_sync:
            for handle in self.streams:
                handle.synchronize()
            return
        caller = self._caller()
        for handle in entered.values():
            if handle is not caller:
                caller.wait_event(self.record_on(handle))

    def record_on(self, handle: Any) -> Any:
        """An event on ``handle`` (no step entry: used to end one)."""
        event = self.torch.Event(device=self.device)
        event.record(handle)
        return event

    def close(self) -> None:
        self._entered, self._entry = {}, None
        for handle in self.streams:
            handle.synchronize()
        self.streams.clear()
