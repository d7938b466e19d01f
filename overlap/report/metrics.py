"""The figures that say whether a schedule overlaps well.

Step time alone hides *why* a plan is fast. These metrics split it: how much communication is
still exposed (no compute runs beside it), how busy the compute and communication lanes are,
the speed-up over the unoverlapped baseline, and the overlap efficiency

    eta = (T_seq - T_plan) / (T_seq - T_bound)

the share of the time the best possible overlap could save that the plan actually saves
(``T_bound`` is the simulator's lower bound for the plan's own work; ``docs/simulator.md``).
"""

from __future__ import annotations

from typing import Any

import attrs

from overlap.backends.timeline import Timeline, covered, uncovered


@attrs.frozen
class Metrics:
    """Figures of one timeline, in seconds unless named otherwise.

    step_s:          makespan.
    compute_busy_s:  time at least one compute (or host) op runs.
    comm_busy_s:     time at least one collective runs.
    comm_total_s:    summed collective durations.
    exposed_comm_s:  collective time during which no compute op runs.
    compute_util:    compute_busy_s / step_s.
    comm_util:       comm_busy_s / step_s.
    bound_s:         lower bound on step_s (None when unknown, e.g. measured).
    baseline_s:      the sequential step time compared against (None without a baseline).
    speedup:         baseline_s / step_s.
    efficiency:      eta; None when there is no baseline or bound, or nothing to gain
                     (T_seq <= T_bound).
    """

    strategy: str
    step_s: float
    compute_busy_s: float
    comm_busy_s: float
    comm_total_s: float
    exposed_comm_s: float
    compute_util: float
    comm_util: float
    bound_s: float | None = None
    baseline_s: float | None = None
    speedup: float | None = None
    efficiency: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def efficiency(t_seq: float, t_plan: float, t_bound: float) -> float | None:
    """Overlap efficiency (T_seq - T_plan) / (T_seq - T_bound); None when T_seq <= T_bound."""
    gain = t_seq - t_bound
    if gain <= 0:
        return None
    return (t_seq - t_plan) / gain


def metrics(timeline: Timeline, baseline: Timeline | float | None = None) -> Metrics:
    """The metrics of ``timeline``, against ``baseline`` (the sequential plan's timeline or its
    step time) for the speed-up and the overlap efficiency."""
    step = timeline.makespan
    compute = [(s.start, s.end) for s in timeline.spans if s.kind != "comm"]
    comm = [(s.start, s.end) for s in timeline.spans if s.kind == "comm"]
    compute_busy, comm_busy = covered(compute), covered(comm)
    base = baseline.makespan if isinstance(baseline, Timeline) else baseline
    speedup = base / step if base is not None and step > 0 else None
    eta = None
    if base is not None and timeline.bound_s is not None:
        eta = efficiency(base, step, timeline.bound_s)
    return Metrics(
        strategy=timeline.strategy,
        step_s=step,
        compute_busy_s=compute_busy,
        comm_busy_s=comm_busy,
        comm_total_s=sum(b - a for a, b in comm),
        exposed_comm_s=uncovered(comm, compute),
        compute_util=compute_busy / step if step > 0 else 0.0,
        comm_util=comm_busy / step if step > 0 else 0.0,
        bound_s=timeline.bound_s,
        baseline_s=base,
        speedup=speedup,
        efficiency=eta,
    )
