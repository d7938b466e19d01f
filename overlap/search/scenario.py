"""A deployment scenario and the simulated comparison of strategies on it.

"Which schedule wins for DeepSeek-V3 on a 910B at EP16 with 16k prefill tokens per rank?" takes
a model graph, a batch, a split and a plan per strategy, each simulated against the sequential
baseline. :func:`compare` does that once, so the CLI, the benchmarks and a notebook all agree on
how a scenario is built. Strategies may want a different attention grain (DeepSeek's decode
pipeline needs attention in two stages, multistream MLA the fine grain); the graph is built per
grain as needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs

from overlap.backends.simulated import simulate
from overlap.backends.timeline import Timeline
from overlap.cost import Hardware, get_hardware, op_time
from overlap.errors import ConfigError, OverlapError, suggest
from overlap.ops_graph.graph import ModelGraph
from overlap.ops_graph.op import OpKind
from overlap.ops_graph.shape import Shape
from overlap.plan import STRATEGIES, Batch, Plan, Split, build_plan, split
from overlap.plan.batch import MAX_REQUESTS
from overlap.report.metrics import Metrics, metrics
from overlap.search.choice import search

BASELINE = "sequential"


def _positive(instance: object, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"'{attribute.name}' must be >= 1 (got {value})")


@attrs.frozen
class Scenario:
    """A model on a deployment, and the batch one rank runs in the step.

    tokens:    prefill: tokens per rank (default 16384); decode: ignored unless ``requests``
               is unset (one token per request; default 256 requests).
    requests:  prefill: prompts the tokens are spread over (default 4: DeepSeek's profiled
               4k-token prompts); decode: requests in the batch.
    context:   tokens already cached per request (default 0 prefill, 4096 decode).
    query_len: decode: query tokens per request (1; k+1 with k MTP / speculative tokens:
               DeepSeek decodes 2 per request).
    attention: the attention grain for every strategy; None: each strategy's own (``Strategy.grain``).
    comm_mode: ``normal`` or ``low_latency``; None: low latency for decode.
    """

    model: str = "deepseek-v3"
    hardware: str = "910b2"
    phase: str = "prefill"
    tokens: int | None = attrs.field(default=None, validator=_positive)
    requests: int | None = attrs.field(default=None, validator=_positive)
    context: int | None = None
    tp: int = attrs.field(default=1, validator=_positive)
    ep: int = attrs.field(default=16, validator=_positive)
    dp: int = attrs.field(default=1, validator=_positive)
    moe_comm: str = ""  # "": all_to_all when ep > 1, else all_reduce (see ParallelConfig)
    dtype: str = "bf16"
    attention: str | None = None
    microbatches: int = attrs.field(default=2, validator=_positive)
    comm_mode: str | None = None
    comm_share: float | None = None
    num_layers: int | None = None
    query_len: int = attrs.field(default=1, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.phase not in ("prefill", "decode"):
            raise ConfigError(f"'phase' must be one of prefill, decode (got {self.phase!r})")
        if self.context is not None and self.context < 0:
            raise ConfigError(f"'context' must be >= 0 (got {self.context})")
        if self.phase == "decode" and None not in (self.tokens, self.requests) and (
                self.tokens != self.requests * self.query_len):
            raise ConfigError(f"a decode step computes {self.query_len} token(s) per request: "
                              f"'tokens' ({self.tokens}) must equal 'requests' ({self.requests}) "
                              f"x 'query_len' ({self.query_len})")
        if self.phase == "prefill" and self.query_len != 1:
            raise ConfigError("'query_len' applies to decode (prefill queries are the prompts)")

    def batch(self) -> Batch:
        """The rank's batch: prompts sharing ``tokens``, or decode requests."""
        if self.phase == "decode":
            count = self.requests or (self.tokens // self.query_len if self.tokens else 256)
            context = 4096 if self.context is None else self.context
            if self.query_len > 1:
                return Batch.of([(self.query_len, context)] * count)
            return Batch.decode(count, context)
        tokens = self.tokens or 16384
        requests = self.requests or min(4, tokens)
        if requests > tokens:
            raise ConfigError(f"'requests' ({requests}) must be <= 'tokens' ({tokens}) in prefill")
        if requests > MAX_REQUESTS:  # before a billion pairs are generated
            raise ConfigError(f"'requests' must be <= {MAX_REQUESTS} (got {requests})")
        base, extra = divmod(tokens, requests)
        return Batch.of((base + (i < extra), self.context or 0) for i in range(requests))

    @property
    def mode(self) -> str:
        return self.comm_mode or ("low_latency" if self.phase == "decode" else "normal")

    def grain(self, strategy: str) -> str:
        return self.attention or STRATEGIES[strategy].grain

    def model_graph(self, grain: str = "one") -> ModelGraph:
        from overlap.ops_graph.templates import build_model

        return build_model(self.model, self.parallel(),
                           phase=self.phase, attention=grain, dtype=self.dtype,
                           num_layers=self.num_layers)

    def parallel(self):
        """The scenario's :class:`~overlap.ops_graph.templates.ParallelConfig`."""
        from overlap.ops_graph.templates import ParallelConfig

        return ParallelConfig(tp=self.tp, ep=self.ep, dp=self.dp, moe_comm=self.moe_comm)

    def describe(self) -> str:
        """One line: model, hardware, phase, batch and parallelism."""
        b = self.batch()
        if self.phase == "decode":
            what = f"decode of {len(b)} requests (context {b.requests[0].context_len})"
            if self.query_len > 1:
                what += f", {self.query_len} query tokens each"
        else:
            what = f"prefill of {b.tokens} tokens per rank ({len(b)} requests)"
        return (f"{self.model} on {get_hardware(self.hardware).name}: {what}, "
                f"TP{self.tp} EP{self.ep} DP{self.dp} ({self.parallel().moe_comm} MoE), {self.dtype}, "
                f"{self.mode} collectives")

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Result:
    """One strategy on a scenario: its plan, timeline and metrics, or why it could not run."""

    strategy: str
    plan: Plan | None = attrs.field(default=None, repr=False)
    timeline: Timeline | None = attrs.field(default=None, repr=False)
    metrics: Metrics | None = None
    error: str | None = None


def strategy_names(spec: str | Iterable[str]) -> list[str]:
    """``all``, one name, or a comma-separated list -> registered strategy names."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ConfigError(f"'--strategy' names no strategy (got {spec!r}); valid: all, "
                          f"{', '.join(STRATEGIES)}")
    for name in names:
        if name != "all" and name not in STRATEGIES:
            raise ConfigError(f"unknown strategy {name!r}{suggest(name, ['all', *STRATEGIES])}; "
                              f"valid: all, {', '.join(STRATEGIES)}")
    # 'all' may appear in a list ("all,sequential"): it stands for every strategy, once each.
    expanded = [n for name in names for n in (STRATEGIES if name == "all" else [name])]
    return list(dict.fromkeys(expanded))


def cost_of(model: ModelGraph, hardware: str | Hardware) -> Callable[[Shape], float]:
    """Microbatch cost for cost-balanced splits: the roofline time of the last layer's compute."""
    hw = get_hardware(hardware)
    ops = [op for op in model.layers[-1] if op.kind is OpKind.COMPUTE]

    def cost(shape: Shape) -> float:
        return sum(op_time(op.cost(shape), hw).total_s for op in ops)

    return cost


class _Builder:
    """Graphs per grain and the split, built once per scenario."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario, self.batch = scenario, scenario.batch()
        self.graphs: dict[str, ModelGraph] = {}

    def graph(self, grain: str) -> ModelGraph:
        if grain not in self.graphs:
            self.graphs[grain] = self.scenario.model_graph(grain)
        return self.graphs[grain]

    def split(self, model: ModelGraph) -> Split:
        return split(self.batch, self.scenario.microbatches, balance="cost",
                     cost=cost_of(model, self.scenario.hardware),
                     split_requests=True)

    def plan(self, strategy: str) -> Plan:
        s = self.scenario
        model = self.graph(s.grain(strategy))
        if STRATEGIES[strategy].build is None:  # auto: searched on the scenario's hardware and grains
            return search(model, self.batch, s.hardware, graphs=self.graph, attention=s.grain(strategy),
                          comm_mode=s.mode, progress=False).plan
        return build_plan(strategy, model, self.split(model))


def plan_for(scenario: Scenario, strategy: str) -> Plan:
    """The validated plan of ``strategy`` for ``scenario``."""
    return _Builder(scenario).plan(strategy)


def run(scenario: Scenario, strategy: str) -> Timeline:
    """The simulated timeline of one strategy on ``scenario``."""
    return _simulate(scenario, plan_for(scenario, strategy))


def _simulate(scenario: Scenario, plan: Plan) -> Timeline:
    return simulate(plan, scenario.hardware, comm_mode=scenario.mode,
                    comm_compute_share=scenario.comm_share)


def compare(scenario: Scenario, strategies: str | Sequence[str] = "all") -> list[Result]:
    """Every strategy in ``strategies`` simulated on ``scenario``, measured against sequential.

    A strategy that cannot build a plan for the scenario (e.g. it needs two microbatches) gives
    a :class:`Result` with its ``error`` instead of failing the comparison.
    """
    names = strategy_names(strategies)
    builder = _Builder(scenario)
    base_plan = builder.plan(BASELINE)
    baseline = _simulate(scenario, base_plan)
    out = []
    for name in names:
        try:
            plan = base_plan if name == BASELINE else builder.plan(name)
            timeline = baseline if name == BASELINE else _simulate(scenario, plan)
        except OverlapError as exc:
            if len(names) == 1:
                raise
            out.append(Result(name, error=str(exc)))
            continue
        out.append(Result(name, plan, timeline, metrics(timeline, baseline)))
    return out


def best(results: Sequence[Result]) -> Result:
    """The fastest result that ran."""
    ran = [r for r in results if r.metrics is not None]
    if not ran:
        raise ConfigError("no strategy could run on this scenario")
    return min(ran, key=lambda r: r.metrics.step_s)
