"""Execution backends: one :class:`Executor` runs a Plan on any of them.

``inline`` (calling thread, issue order), ``threads`` (a worker thread per stream, events),
``torch_streams`` (``torch.Stream``/``torch.Event`` on the accelerator torch reports), ``npu``
(Ascend specifics on top) and ``recording`` (a test double). ``Executor(..., record=True)`` times
a run into a :class:`Timeline`, the same object the simulator predicts. Backends that need torch are imported
only when asked for, so this package stays torch-free.
"""

from __future__ import annotations

import importlib
from typing import Any

from overlap.backends.executor import (
    BACKENDS,
    Backend,
    BackendUnavailableError,
    ExecutionError,
    Executor,
    get_backend,
)
from overlap.backends.timeline import Span, Timeline

_LAZY = {
    "InlineBackend": "overlap.backends.inline",
    "ThreadsBackend": "overlap.backends.threads",
    "RecordingBackend": "overlap.backends.recording",
    "TorchStreamsBackend": "overlap.backends.torch_streams",
    "NpuBackend": "overlap.backends.npu",
    "simulated": "overlap.backends.simulated",
}


def __getattr__(name: str) -> Any:
    """Backend classes (and the simulator module) on first use, without importing torch early."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    return module if name == "simulated" else getattr(module, name)


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailableError",
    "ExecutionError",
    "Executor",
    "InlineBackend",
    "NpuBackend",
    "RecordingBackend",
    "Span",
    "ThreadsBackend",
    "Timeline",
    "TorchStreamsBackend",
    "get_backend",
]
