"""A Timeline: what ran where and when, as every backend reports it.

The simulator predicts one; the real backends measure one when their Executor is built with
``record=True`` (host clock for ``inline``/``threads``, device events for ``torch_streams``/``npu``).
It lives here, next to the backends that produce it; ``overlap.report`` (metrics, the Perfetto
trace, the Gantt picture) only reads it, so a prediction and a measurement are shown and compared
the same way. Times are seconds from the start of the step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

SPAN_KINDS = ("compute", "comm", "host")


@attrs.frozen
class Span:
    """One (layer, microbatch, op) on one stream, from ``start`` to ``end`` seconds."""

    layer: int
    micro: int
    op: str
    stream: int
    start: float
    end: float
    kind: str = attrs.field(validator=attrs.validators.in_(SPAN_KINDS))

    @property
    def duration(self) -> float:
        return self.end - self.start

    def label(self) -> str:
        return f"{self.op}({self.micro})@{self.layer}"


@attrs.frozen
class Timeline:
    """The spans of one executed (or simulated) plan.

    strategy: the plan's strategy name.
    streams:  stream names; ``Span.stream`` indexes this.
    spans:    in step (host issue) order.
    device:   what it ran on (a hardware preset name, or a device description).
    bound_s:  the lower bound on the makespan the cost model gives for this plan's work (see
              ``docs/simulator.md``); None for a measured timeline.
    measured: True when the spans were timed on a real run (not predicted).
    """

    strategy: str
    streams: tuple[str, ...] = attrs.field(converter=tuple)
    spans: tuple[Span, ...] = attrs.field(converter=tuple, repr=lambda s: f"<{len(s)} spans>")
    device: str = ""
    bound_s: float | None = None
    measured: bool = False

    @property
    def makespan(self) -> float:
        """Seconds from the start of the step (time 0) to the last end (0 when empty)."""
        return max((s.end for s in self.spans), default=0.0)

    def of_kind(self, kind: str) -> tuple[Span, ...]:
        return tuple(s for s in self.spans if s.kind == kind)

    def on_stream(self, stream: int) -> tuple[Span, ...]:
        return tuple(s for s in self.spans if s.stream == stream)

    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({s.layer for s in self.spans}))


def kernel_timeline(profile: Any, strategy: str = "measured") -> Timeline:
    """A profiler trace's kernels (an :class:`overlap.cost.traces.KernelProfile`) as a measured
    Timeline: one span per kernel, named by its op (``~role`` when unmodelled), its layer (-1
    outside any), compute streams first; time 0 at the first kernel."""
    streams = [*profile.compute_streams, *profile.comm_streams]
    index = {s: i for i, s in enumerate(streams)}
    t0 = profile.kernels[0].kernel.start_us if profile.kernels else 0.0
    spans = [Span(-1 if m.layer is None else m.layer, 0, m.op or f"~{m.role}", index[m.kernel.stream],
                  (m.kernel.start_us - t0) * 1e-6, (m.kernel.end_us - t0) * 1e-6,
                  "compute" if m.kind == "compute" else "comm")
             for m in profile.kernels]
    names = [f"{'comm' if s in profile.comm_streams else 'compute'} (stream {s})" for s in streams]
    return Timeline(strategy, names, spans, device=profile.device or "trace", measured=True)


def union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint, sorted intervals covering the same time as ``intervals``."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def covered(intervals: Iterable[tuple[float, float]]) -> float:
    """Total time covered by at least one interval."""
    return sum(b - a for a, b in union(intervals))


def uncovered(intervals: Iterable[tuple[float, float]], cover: Iterable[tuple[float, float]]) -> float:
    """Time inside ``intervals`` that no interval of ``cover`` overlaps."""
    mine, theirs = union(intervals), union(cover)
    total, j = 0.0, 0
    for a, b in mine:
        hidden = 0.0
        while j < len(theirs) and theirs[j][1] <= a:
            j += 1
        k = j
        while k < len(theirs) and theirs[k][0] < b:
            hidden += min(b, theirs[k][1]) - max(a, theirs[k][0])
            k += 1
        total += (b - a) - hidden
    return total
