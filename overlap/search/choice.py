"""The choice: search the space under the evaluator and keep the fastest plan.

The search is a staged coordinate descent, not an exhaustive product (which would be ~10^3
simulations): order x count on balanced cuts, then cut points for the best few, then the graph
grain and the vector stream for the best one. Only the winner and the named strategies nearest
the top are built and simulated at full depth, and the fastest of those is returned: the search
does not return a plan the simulator rates slower than those named strategies (the benchmark
checks every named one).

Hardware is required: a preset name or a (calibrated) :class:`~overlap.cost.hardware.Hardware`.
There is no default, because a schedule found for one machine is not the best on another.

Graph variants: the attention grain changes the graph, not the plan, so the search accepts an
optional ``graphs`` factory ``attention -> ModelGraph`` (``templates_graphs`` makes one from a
template). Without it, the model's own grain is searched.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable

import attrs

from overlap.cost.hardware import Hardware, get_hardware
from overlap.errors import ConfigError
from overlap.ops_graph.graph import ModelGraph
from overlap.plan.batch import Batch
from overlap.plan.plan import Plan
from overlap.search.evaluator import Evaluator, Progress, Scorer, simulated
from overlap.search.space import (
    MICRO_COUNTS,
    Choice,
    GraphFactory,
    cut_variants,
    distinct,
    graph_variants,
    named_choices,
    orders_as_choices,
    present_stages,
)

FINALISTS = 4  # named strategies verified at full depth beside the winner


@attrs.frozen
class SearchResult:
    """What ``search`` found: the plan, its simulated step time and what it was measured against."""

    plan: Plan
    step_s: float
    choice: Choice
    baseline: str  # the best named strategy (and its grain, if not the model's own)
    baseline_s: float
    evaluated: int  # candidates scored
    elapsed_s: float

    @property
    def speedup(self) -> float:
        """Baseline step time over ours (>= 1: auto never loses)."""
        return self.baseline_s / self.step_s if self.step_s > 0 else 1.0


def search(model: ModelGraph, batch: Batch, hardware: str | Hardware, *,
           graphs: GraphFactory | None = None, attention: str = "", comm_mode: str = "normal",
           micro_counts: Iterable[int] = MICRO_COUNTS, score: Scorer | None = None,
           top: int = 3, progress: bool | None = None) -> SearchResult:
    """Search the schedule space for ``batch`` on ``model`` and return the fastest plan found.

    hardware:     preset name or (calibrated) :class:`Hardware` the simulator scores on; required.
    graphs:       ``attention grain -> ModelGraph`` to also search the grain (e.g.
                  :func:`templates_graphs`); ``attention`` names ``model``'s own grain.
    comm_mode:    ``normal`` or ``low_latency`` (DeepEP-style all-to-all, for decode).
    micro_counts: the microbatch counts to try (pin one when data-parallel ranks must agree).
    score:        ``(plan, hardware) -> seconds``; the simulator's step time by default.
    top:          how many (count, order) pairs get their cut points refined.
    progress:     show progress on stderr; by default only on a terminal.
    """
    start = time.perf_counter()
    hw = require_hardware(hardware)
    counts = _check_counts(micro_counts)
    if not isinstance(batch, Batch):
        raise ConfigError(f"'batch' must be a Batch (got {type(batch).__name__})")
    if top < 1:
        raise ConfigError(f"'top' must be >= 1 (got {top})")

    def factory(grain: str) -> ModelGraph:
        return model if graphs is None or grain in ("", attention) else graphs(grain)

    show = sys.stderr.isatty() if progress is None else progress
    ev = Evaluator(factory, batch, hw, score or simulated(comm_mode), Progress(show))

    named_scores = {c: ev(c) for c in named_choices(graphs is not None)}
    present = present_stages(model)
    scored: dict[Choice, float] = {}
    first = 2 if 2 in counts else counts[0]
    for c in distinct(orders_as_choices(first, present), present, model):
        scored[c] = ev(c)
    lead = sorted(scored, key=scored.get)[:top]
    for n in counts:
        if n != first:  # the best orders, generalised to the other microbatch counts
            for c in orders_as_choices(n, present):
                if c.order in {b.order for b in lead} or n == 1:
                    scored[c] = ev(c)
    for c in sorted(scored, key=scored.get)[:top]:
        for v in cut_variants(c):
            scored[v] = ev(v)
    best = min(scored, key=scored.get)
    for v in graph_variants(best, graphs, attention):
        scored[v] = ev(v)
    best = min(scored, key=scored.get)

    result = _verify(ev, best, named_scores)
    ev.progress.done()
    return attrs.evolve(result, evaluated=ev.count, elapsed_s=time.perf_counter() - start)


def _verify(ev: Evaluator, best: Choice, named_scores: dict[Choice, float]) -> SearchResult:
    """Full-depth simulation of the winner and of the best named strategies (those within 1%
    of the best estimate, at most FINALISTS distinct estimates): the fastest is returned."""
    floor = min(named_scores.values())
    finalists: list[Choice] = []
    for c in sorted(named_scores, key=named_scores.get):
        s = named_scores[c]
        if s <= floor * 1.01 and all(s != named_scores[f] for f in finalists):
            finalists.append(c)
    finalists = finalists[:FINALISTS]
    full = {c: ev.full(c) for c in dict.fromkeys([best, *finalists])}
    base = min(finalists, key=lambda c: full[c][1])
    win = min(full, key=lambda c: (full[c][1], c is not best))
    plan, step_s = full[win]
    return SearchResult(plan, step_s, win, base.describe().removeprefix("named "), full[base][1],
                        0, 0.0)


def _check_counts(counts: Iterable[int]) -> tuple[int, ...]:
    out = tuple(counts)
    bad = [n for n in out if not (isinstance(n, int) and 1 <= n <= max(MICRO_COUNTS))]
    if not out or bad:
        raise ConfigError(f"'micro_counts' must be a non-empty subset of "
                          f"{', '.join(map(str, MICRO_COUNTS))} (got {out!r})")
    return out




def require_hardware(hardware: str | Hardware | None) -> Hardware:
    """``hardware`` as a :class:`Hardware`; None is refused with what to pass instead."""
    if hardware is None:
        from overlap.cost.hardware import HARDWARE

        raise ConfigError("strategy 'auto' searches under a cost model and needs hardware: pass a "
                          f"preset ({', '.join(HARDWARE)}) or a calibrated Hardware "
                          "(overlap calibrate)")
    return get_hardware(hardware)
