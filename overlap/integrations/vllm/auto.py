"""``strategy: "auto"`` in the vLLM plugin: a per-step decision on the adapter's own graph.

The adapter's ops (``graph``) are vLLM module calls without cost figures. :func:`with_costs`
gives each of them the cost of the model template's ops that do the same work, matched by
stage (``plan.stages``): the template's attention stage to the adapter's ``attn``, its gate to
``gate`` (or ``post_norm``), its dispatch/experts/combine/shared/merge to the adapter's ops of
those stages. A template stage the adapter has no op for (the coarse form runs gate, experts,
shared experts and merge as one ``experts`` op) adds its compute cost to the adapter's op of
the closest earlier stage; a template collective without an adapter counterpart (none in the
forms the adapter serves) is dropped and named in :attr:`AutoPlanner.unmatched`.

:class:`AutoPlanner` owns a :class:`~overlap.search.Planner` whose graphs are these costed
adapter graphs (so the search only proposes plans the adapter can run: its op grain, and no
expert chunks, which bound callables cannot be cut into). Each step it decides the schedule
(agreed across data-parallel ranks with one MAX all-reduce), and the adapter splits at request
boundaries into the decided count and builds the decided plan on its bound graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from overlap.ops_graph.cost import FREE, OpCost
from overlap.ops_graph.graph import Graph, ModelGraph
from overlap.ops_graph.op import OpKind
from overlap.plan.batch import Batch
from overlap.plan.plan import Plan
from overlap.plan.split import Split
from overlap.plan.stages import STAGES, stages
from overlap.search import Planner
from overlap.search.decision import Decision
from overlap.search.space import realise

PHASES = ("prefill", "decode")


def with_costs(graph: Graph, template: Graph) -> tuple[Graph, list[str]]:
    """``graph`` with each op's cost taken from ``template`` by stage, and the template ops whose
    cost had nowhere to go (see the module docstring)."""
    mine, theirs = stages(graph), stages(template)
    costs: dict[str, OpCost] = {}
    unmatched: list[str] = []
    last_compute = ""
    for stage in STAGES:
        targets = {kind: next((n for n in mine[stage] if (graph[n].kind is OpKind.COMM) == kind),
                              "") for kind in (True, False)}
        if targets[False]:
            last_compute = targets[False]
        for name in theirs[stage]:
            op = template[name]
            comm = op.kind is OpKind.COMM
            target = targets[comm] or ("" if comm else last_compute or _first_compute(graph, mine))
            if not target:
                unmatched.append(name)
                continue
            costs[target] = costs.get(target, FREE) + op.cost
    ops = [attrs.evolve(op, cost=costs.get(op.name, op.cost)) for op in graph.ops]
    return attrs.evolve(graph, ops=ops), unmatched


def _first_compute(graph: Graph, groups: Mapping[str, tuple[str, ...]]) -> str:
    for stage in STAGES:
        for name in groups[stage]:
            if graph[name].kind is not OpKind.COMM:
                return name
    return ""


def costed_model(model: ModelGraph, templates: Callable[[bool], Graph]) -> tuple[ModelGraph, list[str]]:
    """Every distinct layer of ``model`` costed from ``templates(routed)`` (MoE or dense)."""
    done: dict[int, Graph] = {}
    unmatched: list[str] = []
    for g in model.distinct():
        routed = any(op.role in ("experts", "dispatch", "gate") for op in g.ops)
        done[id(g)], missing = with_costs(g, templates(routed))
        unmatched += [f"{g.name}:{n}" for n in missing]
    return ModelGraph(model.name, [done[id(g)] for g in model.layers]), unmatched


@attrs.define
class AutoPlanner:
    """The plugin's ``auto``: decisions for one engine's model on the configured hardware.

    model:    the adapter's bound model graph (its ops' callables run the step).
    hf_config: the model's Hugging Face config (a mapping), for the cost template.
    parallel: the template's :class:`~overlap.ops_graph.templates.ParallelConfig`.
    hardware: the preset the plans are scored on.
    max_micro: the largest microbatch count the search may pick.
    """

    model: ModelGraph
    hf_config: Mapping[str, Any]
    parallel: Any
    hardware: str
    max_micro: int = 2
    dtype: str = "bf16"
    unmatched: list[str] = attrs.field(factory=list)
    _costed: dict[str, ModelGraph] = attrs.field(factory=dict, repr=False)
    _planner: Planner | None = attrs.field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        self._planner = Planner(dict(self.hf_config), self.parallel, self.hardware,
                                dtype=self.dtype, micro_counts=tuple(range(1, self.max_micro + 1)),
                                graphs_for=self._graphs)

    def costed(self, phase: str) -> ModelGraph:
        """The adapter's model graph with the ``phase`` template's costs (built once)."""
        if phase not in self._costed:
            from overlap.ops_graph.templates import layer_graph

            def template(routed: bool) -> Graph:
                return layer_graph(dict(self.hf_config), self.parallel, routed=routed,
                                   phase=phase, dtype=self.dtype)

            self._costed[phase], missing = costed_model(self.model, template)
            self.unmatched += [m for m in missing if m not in self.unmatched]
        return self._costed[phase]

    def _graphs(self, phase: str) -> Callable[[str], ModelGraph]:
        graph = self.costed(phase)
        return lambda grain: graph  # the adapter has one grain: its own

    def decide(self, batch: Batch | None,
               all_reduce_max: Callable[[Sequence[int]], Sequence[int]] | None) -> Decision:
        """This step's decision (``all_reduce_max``: the data-parallel group's, or None)."""
        return self._planner.decide(batch, agree=all_reduce_max)

    def plan(self, decision: Decision, planned: Split) -> Plan:
        """``decision``'s plan on the adapter's costed graph for the step's split (the adapter
        cuts at request boundaries, so the choice's own cut points give way to ``planned``)."""
        model = self.costed(decision.key[0])
        return realise(decision.choice, model, planned.batch, part=planned)


# -- the adapter's side --------------------------------------------------------------------------


def for_adapter(adapter: Any) -> AutoPlanner:
    """The :class:`AutoPlanner` of a ``DeepseekOverlap`` whose layers are bound."""
    from overlap.ops_graph.op import Collective
    from overlap.ops_graph.templates import ParallelConfig

    model = adapter._model_graph
    sizes = {op.comm.size for g in model.distinct() for op in g.ops
             if op.comm is not None and op.comm.collective is Collective.ALL_TO_ALL}
    parallel = ParallelConfig(tp=adapter.tp, ep=max(sizes, default=1), dp=adapter.dp)
    hf = adapter.vllm_config.model_config.hf_config
    return AutoPlanner(model, hf.to_dict() if hasattr(hf, "to_dict") else dict(hf), parallel,
                       adapter.config.hardware, max_micro=adapter.config.microbatches)


def plan_step(adapter: Any, batch: Batch | None) -> tuple[Split | None, str]:
    """The step's split for ``strategy`` ``auto`` (decided now, kept on the adapter as
    ``decision``) or ``off``; None and why when the step runs the stock forward."""
    from overlap.integrations.vllm.adapter import decide_split

    if adapter.config.strategy == "off":
        return None, "strategy 'off': the model's own forward"
    if adapter._layers is None:
        adapter.unsupported = adapter._bind_layers()
        if adapter.unsupported:
            return None, adapter.unsupported
    if adapter.auto is None:
        adapter.auto = for_adapter(adapter)
    agree = adapter._all_reduce_max if adapter.dp > 1 else None
    decision = adapter.decision = adapter.auto.decide(batch, agree)
    adapter.stats["auto_off" if decision.off else f"auto_{decision.n_micro}_microbatches"] += 1
    if decision.off:
        return None, f"auto decided off ({decision.reason or decision.choice.describe()})"
    config = attrs.evolve(adapter.config, microbatches=decision.n_micro)
    return decide_split(batch, config, adapter.dp, adapter._all_reduce_min)
