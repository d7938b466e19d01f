"""The ``npu`` backend: ``torch_streams`` plus what only Ascend (torch-npu, torchair) offers.

* **Per-stream core limits.** A plan stream's ``share`` (the fraction of the AI cores a compute
  stream may use, e.g. to leave vector cores to HCCL's AIV-mode collectives) becomes
  ``torch.npu.set_stream_limit(stream, cube_num, vector_num)``, computed from the device's cores
  as reported by ``torch.npu.get_device_limit``. Older torch-npu builds without these calls run
  without limits (listed in :attr:`NpuBackend.skipped`).
* **Graph mode (torchair).** When a model is captured into an NPU graph, there are no runtime
  streams to issue to: ops are tagged with ``npu_stream_switch(tag, priority)`` (from
  ``torchair.scope``, or ``torchair.ops.NpuStreamSwitch`` in older torchair) and the graph
  compiler places them. Data dependencies between tagged streams are synchronised by the compiler,
  so the plan's data waits need no call; a plan's *explicit* waits (``extra_waits``, ordering
  without data) would need ``npu_wait_tensor`` on tensors the executor does not expose, so a plan
  with such waits is refused in graph mode rather than run with a silently missing order.

Every torch-npu / torchair call is in one small method here, so the logic around them is tested
on CPU with fakes. None of this has been run on Ascend hardware (see docs/backends.md).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

from overlap._optional import require
from overlap.backends.executor import BackendUnavailableError
from overlap.backends.torch_streams import TorchStreamsBackend
from overlap.errors import ConfigError
from overlap.plan.plan import Stream


def core_limits(share: float | None, cube_total: int, vector_total: int) -> tuple[int, int] | None:
    """(cube cores, vector cores) for a stream allowed ``share`` of the device; None: no limit."""
    if share is None:
        return None
    if not 0.0 < share <= 1.0:
        raise ConfigError(f"stream 'share' must be in (0, 1] (got {share})")
    return max(1, math.floor(share * cube_total)), max(1, math.floor(share * vector_total))


def torchair_scope(module: Callable[[str], ModuleType] = importlib.import_module
                   ) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(npu_stream_switch, npu_wait_tensor) from wherever this torchair keeps them."""
    try:
        scope = module("torchair.scope")
        return scope.npu_stream_switch, scope.npu_wait_tensor
    except (ImportError, AttributeError):
        pass
    try:
        ops = module("torchair.ops")
        return ops.NpuStreamSwitch, ops.npu_wait_tensor
    except (ImportError, AttributeError):
        raise BackendUnavailableError(
            "backend 'npu' with graph_mode=True needs torchair (torchair.scope.npu_stream_switch "
            "or torchair.ops.NpuStreamSwitch); install torchair matching your torch-npu") from None


class GraphTag(NamedTuple):
    """A plan stream in graph mode: the torchair stream label and priority (None: main stream)."""

    tag: str | None
    priority: int


class NpuBackend(TorchStreamsBackend):
    """Plan streams on an Ascend NPU, with core limits and (optionally) torchair stream tags.

    device:     the NPU (default: the current one).
    graph_mode: tag ops for torchair graph capture instead of issuing to runtime streams.
    torch, torch_npu, torchair: modules to use (tests pass fakes; torchair is
                (npu_stream_switch, npu_wait_tensor)).
    """

    name = "npu"

    def __init__(self, device: Any = None, *, graph_mode: bool = False, annotate: bool = False,
                 torch: ModuleType | None = None, torch_npu: ModuleType | None = None,
                 torchair: tuple[Callable[..., Any], Callable[..., Any]] | None = None) -> None:
        self.torch_npu = torch_npu or require("torch_npu", purpose="the 'npu' backend")
        super().__init__(device, annotate=annotate, torch=torch)
        if self.device.type != "npu":
            raise BackendUnavailableError(
                f"backend 'npu' needs an Ascend NPU, but the accelerator is {self.device.type!r}; "
                "use backend 'torch_streams'")
        self.graph_mode = graph_mode
        self.implicit_waits = graph_mode  # read by the Executor: only data waits are kept
        self.stream_switch = (torchair or torchair_scope())[0] if graph_mode else None
        self.limits: dict[str, tuple[int, int]] = {}
        self.skipped: list[str] = []
        self._tags = 0

    # -- streams ----------------------------------------------------------------------------

    def make_stream(self, stream: Stream) -> Any:
        if self.graph_mode:
            tag = GraphTag(None if self._tags == 0 else f"overlap_{stream.name}", 0)
            self._tags += 1
            return tag
        handle = super().make_stream(stream)
        self._limit(stream, handle)
        return handle

    def _limit(self, stream: Stream, handle: Any) -> None:
        npu = self.torch.npu
        if stream.share is None:
            return
        if not (hasattr(npu, "set_stream_limit") and hasattr(npu, "get_device_limit")):
            self.skipped.append(f"{stream.name}: torch.npu.set_stream_limit is not available")
            return
        total = npu.get_device_limit(self.device.index or 0)
        limits = core_limits(stream.share, total["cube_core_num"], total["vector_core_num"])
        npu.set_stream_limit(handle, *limits)
        self.limits[stream.name] = limits

    # -- issuing ----------------------------------------------------------------------------

    def submit(self, handle: Any, fn: Callable[[], None], label: str) -> None:
        if not self.graph_mode:
            super().submit(handle, fn, label)
        elif handle.tag is None:
            fn()
        else:
            with self.stream_switch(handle.tag, handle.priority):
                fn()

    def record(self, handle: Any) -> Any:
        return None if self.graph_mode else super().record(handle)

    def wait(self, handle: Any, event: Any) -> None:
        if not self.graph_mode:
            super().wait(handle, event)

    def host_wait(self, event: Any) -> None:
        if not self.graph_mode:
            super().host_wait(event)

    def use(self, handle: Any, value: Any) -> None:
        if not self.graph_mode:
            super().use(handle, value)

    def synchronize(self) -> None:
        if not self.graph_mode:
            super().synchronize()
