"""What the adapter makes of a recorded step: how much collective time ran under compute.

With ``record`` on (``control(record=True)``, or the ``trace`` config entry for one step) the
executor times every (layer, microbatch, op) span on its stream (``backends.timeline``). The
measure of visible overlap is the share of collective span time during which some compute span
was running on another stream: 0 when communication and computation take turns, 1 when every
collective was hidden. Torch-free, so it is unit-tested on hand-made timelines.
"""

from __future__ import annotations

from overlap.backends.timeline import Timeline, covered, uncovered


def comm_overlap(timeline: Timeline) -> tuple[float, float]:
    """``(collective seconds, of which concurrent with compute)`` in ``timeline``."""
    comm = [(s.start, s.end) for s in timeline.of_kind("comm")]
    compute = [(s.start, s.end) for s in timeline.of_kind("compute")]
    total = covered(comm)
    return total, total - uncovered(comm, compute)


def trace_path(path: str, rank: int, world: int) -> str:
    """Where worker ``rank`` of ``world`` writes the ``trace`` config entry's file."""
    return path if world <= 1 else f"{path}.rank{rank}"
