"""The ``torch_streams`` backend: plan streams as ``torch.Stream``, events as ``torch.Event``.

Device-generic through ``torch.accelerator``: it runs on whatever accelerator torch reports —
CUDA, Ascend NPU (torch-npu registers ``npu``), XPU — with no per-vendor code. Each submitted op
runs on the host with its stream made current, so its kernels are queued there; ``record`` and
``wait`` become ``Event.record(stream)`` and ``stream.wait_event(event)``. A tensor read on a
stream other than the one that made it is marked with ``record_stream`` so the caching allocator
does not hand its memory out again while that stream may still read it.

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
    torch:    the torch module to use; tests pass a fake.
    """

    name = "torch_streams"

    def __init__(self, device: Any = None, *, annotate: bool = False,
                 torch: ModuleType | None = None) -> None:
        self.torch = torch or require("torch", purpose="the 'torch_streams' backend")
        self.device = accelerator_device(self.torch, device)
        self.annotate = annotate
        self.streams: list[Any] = []

    def make_stream(self, stream: Stream) -> Any:
        handle = self.torch.Stream(device=self.device)
        self.streams.append(handle)
        return handle

    def submit(self, handle: Any, fn: Callable[[], None], label: str) -> None:
        scope = self.torch.profiler.record_function(label) if self.annotate else nullcontext()
        with handle, scope:
            fn()

    def record(self, handle: Any) -> Any:
        event = self.torch.Event(device=self.device)
        event.record(handle)
        return event

    def wait(self, handle: Any, event: Any) -> None:
        handle.wait_event(event)

    def timing_event(self, handle: Any) -> Any:
        """A timing event recorded now on ``handle`` (used by ``Executor(record=True)``)."""
        event = self.torch.Event(device=self.device, enable_timing=True)
        event.record(handle)
        return event

    def elapsed_s(self, start: Any, end: Any) -> float:
        """Seconds between two completed timing events (torch reports milliseconds)."""
        return start.elapsed_time(end) / 1e3

    def host_wait(self, event: Any) -> None:
        event.synchronize()

    def use(self, handle: Any, value: Any) -> None:
        """Keep ``value``'s memory reserved until work now queued on ``handle`` has run."""
        if isinstance(value, self.torch.Tensor) and value.device.type == self.device.type:
            value.record_stream(handle)

    def synchronize(self) -> None:
        for handle in self.streams:
            handle.synchronize()

    def close(self) -> None:
        self.synchronize()
        self.streams.clear()
