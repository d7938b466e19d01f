"""The evaluator: a choice's full-depth step time, estimated from small simulated models.

A plan is periodic in the layers, so candidates are scored on two and one copies of the
steady-state (last) layer, and the full step time is extrapolated as ``T2 + (c - 2) * (T2 - T1)``
for its ``c`` copies, plus one simulated layer per copy of any other layer kind (a model of at
most 8 layers is scored whole). That makes a search of a few hundred candidates fast enough to
run once per batch-shape bucket.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from overlap.cost.hardware import Hardware
from overlap.errors import OverlapError
from overlap.ops_graph.graph import ModelGraph
from overlap.ops_graph.op import OpKind
from overlap.plan.batch import Batch
from overlap.plan.plan import Plan
from overlap.plan.split import Split
from overlap.search.space import Choice, GraphFactory, realise, split_of

SHORT_MODEL = 8  # layers: a model this short is scored whole, not extrapolated
Scorer = Callable[[Plan, Hardware], float]


def steady_layers(model: ModelGraph, count: int) -> ModelGraph:
    """``count`` copies of ``model``'s last layer graph (the steady state: DeepSeek's first
    layers are dense, the other 58 MoE), in small."""
    return ModelGraph(model.name, [model.layers[-1]] * count)


def templates_graphs(model: str, parallel=None, *, phase: str = "prefill", dtype: str = "bf16",
                     num_layers: int | None = None) -> GraphFactory:
    """A graph factory over the templates: ``attention grain -> ModelGraph`` (memoised)."""
    from overlap.ops_graph.templates import build_model

    built: dict[str, ModelGraph] = {}

    def graphs(attention: str) -> ModelGraph:
        if attention not in built:
            built[attention] = build_model(model, parallel, phase=phase, attention=attention,
                                           dtype=dtype, num_layers=num_layers)
        return built[attention]

    return graphs


# -- scoring -----------------------------------------------------------------------------------


def simulated(comm_mode: str = "normal") -> Scorer:
    """The default scorer: the simulator's predicted step time with collectives in ``comm_mode``."""
    from overlap.backends.simulated import simulate

    def step_s(plan: Plan, hardware: Hardware) -> float:
        return simulate(plan, hardware, comm_mode=comm_mode).makespan

    return step_s


class Evaluator:
    """Scores choices on small models extrapolated to the full depth, counting what it scored.

    The steady-state layer (the last one) is simulated twice and once: ``T2 + (c - 2) * (T2 - T1)``
    for its ``c`` copies (the plan is periodic); every other distinct layer (DeepSeek's dense
    ones) adds its one-layer time per copy. A model of at most 8 layers is simulated whole.
    """

    def __init__(self, graphs: GraphFactory, batch: Batch, hw: Hardware, score: Scorer,
                 progress: Progress) -> None:
        self.graphs, self.batch, self.hw, self.score = graphs, batch, hw, score
        self.progress = progress
        self.count = 0
        self._proxies: dict[str, tuple[ModelGraph, ModelGraph | None, int, list]] = {}
        self._splits: dict[tuple, Split] = {}
        self._cost = cost_fn(graphs(""), hw)

    def proxies(self, attention: str) -> tuple[ModelGraph, ModelGraph | None, int, list]:
        """(two-layer proxy, one-layer proxy, steady copies, [(other one-layer model, copies)]);
        a short model is its own proxy."""
        if attention not in self._proxies:
            full = self.graphs(attention)
            last = full.layers[-1]
            # A layer whose outputs cannot feed a copy of itself has no repeating steady state.
            if len(full) <= SHORT_MODEL or len(last.outputs) != len(last.inputs):
                self._proxies[attention] = (full, None, 0, [])
            else:
                others = [(ModelGraph(full.name, [g]), sum(x is g for x in full.layers))
                          for g in full.distinct() if g is not last]
                self._proxies[attention] = (steady_layers(full, 2), steady_layers(full, 1),
                                            sum(x is last for x in full.layers), others)
        return self._proxies[attention]

    def split(self, choice: Choice) -> Split:
        """``split_of(choice)``, made once per distinct cut (splitting a big batch is slow)."""
        key = (choice.n, choice.shares, choice.balance) if not choice.named or choice.n == 1 \
            else ("named",)
        if key not in self._splits:
            self._splits[key] = split_of(choice, self.batch, self._cost)
        return self._splits[key]

    def __call__(self, choice: Choice) -> float:
        """Estimated full-depth step time (inf when the choice does not fit the batch)."""
        self.count += 1
        self.progress.tick(self.count)
        two, one, copies, others = self.proxies(choice.attention)
        try:
            part = self.split(choice)

            def time_of(model: ModelGraph) -> float:
                return self.score(realise(choice, model, self.batch, part=part, check=False), self.hw)

            t2 = time_of(two)
            if one is None:
                return t2
            t1 = time_of(one)
            rest = sum(count * time_of(model) for model, count in others)
        except OverlapError:  # a pattern the graph cannot order, or a batch it cannot cut
            return float("inf")
        return t2 + (copies - 2) * (t2 - t1) + rest

    def full(self, choice: Choice) -> tuple[Plan, float]:
        """The validated full-depth plan and its simulated step time (inf if it is invalid)."""
        try:
            plan = realise(choice, self.graphs(choice.attention), self.batch, part=self.split(choice))
        except OverlapError:
            return None, float("inf")  # type: ignore[return-value]
        return plan, self.score(plan, self.hw)


def cost_fn(model: ModelGraph, hw: Hardware) -> Callable:
    """Microbatch cost for cost-balanced cuts: the roofline time of the last layer's compute."""
    from overlap.cost.roofline import op_time

    graph = model.layers[-1]
    ops = [op for op in graph if op.kind is OpKind.COMPUTE]

    memo: dict = {}  # a batch of like requests asks for the same shape many times

    def cost(shape) -> float:
        if shape not in memo:
            memo[shape] = sum(op_time(op.cost(shape), hw).total_s for op in ops)
        return memo[shape]

    return cost


class Progress:
    """A one-line progress count on stderr, shown only on a terminal once the search is slow."""

    def __init__(self, enabled: bool, after_s: float = 0.5) -> None:
        self.enabled, self.after_s, self.start, self.shown = enabled, after_s, time.perf_counter(), False

    def tick(self, count: int) -> None:
        if self.enabled and time.perf_counter() - self.start > self.after_s:
            sys.stderr.write(f"\rauto: {count} candidates scored")
            self.shown = True

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


