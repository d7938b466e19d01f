"""Chrome / Perfetto trace export: open a timeline in ui.perfetto.dev or chrome://tracing.

A predicted timeline in the same format the PyTorch profiler writes can be laid beside a
measured one, and read back by ``overlap.cost.calibrate`` (span names are op names). One process
per timeline, one track (thread) per stream, a complete (``ph: "X"``) event per span, in µs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from overlap._atomic import write_json
from overlap.backends.timeline import Timeline


def chrome_trace(timelines: Timeline | Sequence[Timeline]) -> dict[str, Any]:
    """The trace JSON object of one timeline, or several side by side (one process each)."""
    if isinstance(timelines, Timeline):
        timelines = [timelines]
    events: list[dict[str, Any]] = []
    for pid, tl in enumerate(timelines):
        name = f"{tl.strategy} on {tl.device}" if tl.device else tl.strategy
        events.append({"ph": "M", "pid": pid, "tid": 0, "name": "process_name", "args": {"name": name}})
        events.append({"ph": "M", "pid": pid, "tid": 0, "name": "process_sort_index",
                       "args": {"sort_index": pid}})
        for tid, stream in enumerate(tl.streams):
            events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name",
                           "args": {"name": stream}})
            events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_sort_index",
                           "args": {"sort_index": tid}})
        for s in tl.spans:
            events.append({
                "ph": "X", "pid": pid, "tid": s.stream, "name": s.op, "cat": s.kind,
                "ts": round(s.start * 1e6, 3), "dur": round((s.end - s.start) * 1e6, 3),
                "args": {"layer": s.layer, "micro": s.micro, "op": s.op},
            })
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(timelines: Timeline | Sequence[Timeline], path: str | os.PathLike[str]) -> Path:
    """Write :func:`chrome_trace` to ``path`` atomically (creating its folder); returns the path."""
    return write_json(path, chrome_trace(timelines), separators=(",", ":"))
