"""The plan cache: ``auto``'s decisions per batch-shape bucket, owned by a per-deployment ``Planner``.

A search costs a few hundred simulations; a serving step cannot pay that every time. But the
best schedule depends on the batch only through its rough shape, so decisions are cached per
*bucket*: token count, request count and context length rounded up to powers of two, per phase.
What is cached is the :class:`~overlap.search.space.Choice` (microbatch count, cuts,
order, streams), which :func:`~overlap.search.space.realise` turns into a plan for any
batch of the bucket; the plan of the batch that was searched is kept too, so asking again for
that batch returns the identical object.

No module-level state: the cache is an object, and the :class:`Planner` that the CLI or the
vLLM plugin creates for its deployment (model, parallel config, hardware, dtype) owns one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attrs

from overlap.cost.hardware import Hardware
from overlap.errors import ConfigError
from overlap.ops_graph.graph import ModelGraph
from overlap.ops_graph.templates import ParallelConfig
from overlap.plan.batch import Batch
from overlap.plan.plan import Plan
from overlap.search.choice import SearchResult, require_hardware, search
from overlap.search.decision import Agree, Decision, agreed, canonical, quick_search
from overlap.search.evaluator import templates_graphs
from overlap.search.space import MICRO_COUNTS, Choice, GraphFactory, present_stages, realise

PHASES = ("prefill", "decode")


def bucket(value: int) -> int:
    """``value`` rounded up to a power of two (0 stays 0)."""
    if value < 0:
        raise ConfigError(f"a bucketed count must be >= 0 (got {value})")
    return 1 << (value - 1).bit_length() if value > 0 else 0


@attrs.frozen
class ShapeKey:
    """The bucket of a batch: phase, and tokens, requests and mean context rounded up to 2^k."""

    phase: str
    tokens: int
    requests: int
    context: int

    @classmethod
    def of(cls, phase: str, tokens: int, requests: int, context: int) -> ShapeKey:
        """The bucket of a step with these figures (the fast path: no batch object needed)."""
        if phase not in PHASES:
            raise ConfigError(f"'phase' must be one of {', '.join(PHASES)} (got {phase!r})")
        return cls(phase, bucket(tokens), bucket(requests), bucket(context))

    @classmethod
    def of_batch(cls, batch: Batch, phase: str | None = None) -> ShapeKey:
        """The bucket of ``batch``; the phase is ``decode`` when every request is a decode."""
        reqs = batch.requests
        if phase is None:
            phase = "decode" if all(r.is_decode for r in reqs) else "prefill"
        context = sum(r.context_len for r in reqs) // len(reqs)
        return cls.of(phase, batch.tokens, len(reqs), context)


@attrs.define
class PlanCache:
    """A bounded least-recently-used map from keys to cached values, counting hits and misses."""

    capacity: int = attrs.field(default=1024)
    hits: int = 0
    misses: int = 0
    _entries: OrderedDict = attrs.field(factory=OrderedDict, repr=False)

    @capacity.validator
    def _check_capacity(self, attribute: attrs.Attribute, value: int) -> None:
        if value < 1:
            raise ConfigError(f"'capacity' must be >= 1 (got {value})")

    def get(self, key: Any) -> Any | None:
        """The value under ``key`` (now the most recently used), or None."""
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> None:
        """Store ``value``, evicting the least recently used entry when full."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@attrs.frozen
class Entry:
    """A cached decision and the search result it came from (whose plan is for its batch)."""

    choice: Choice
    result: SearchResult


@attrs.define
class Planner:
    """``auto`` for one deployment, with its own cache: create one per engine, call :meth:`plan`.

    model:    a preset name, config path or HF config mapping (``overlap.ops_graph.templates``).
    parallel: the ``ParallelConfig``; default: none.
    hardware: preset name or (calibrated) :class:`Hardware` the search scores on; required.
    attention: the grain plans run at when the search keeps the model's own.
    graphs_for: ``phase -> (grain -> ModelGraph)`` replacing the templates' graphs (e.g. a
              runtime's own costed graphs, which then define the space).
    """

    model: Any
    parallel: ParallelConfig | None = None
    hardware: str | Hardware | None = None
    dtype: str = "bf16"
    attention: str = "one"
    micro_counts: tuple[int, ...] = MICRO_COUNTS
    num_layers: int | None = None
    graphs_for: Callable[[str], GraphFactory] | None = None
    cache: PlanCache = attrs.field(factory=PlanCache)
    _graphs: dict = attrs.field(factory=dict, repr=False)
    _decisions: dict = attrs.field(factory=dict, repr=False)  # bucket tuple -> Decision
    _identity: str = attrs.field(default="", repr=False)

    def __attrs_post_init__(self) -> None:
        self.hardware = require_hardware(self.hardware)
        # One string (its hash is cached) keeps lookups cheap; it still tells planners apart
        # when several share a cache.
        self._identity = f"{self.model}|{self.hardware!r}|{self.parallel!r}|{self.dtype}"

    def key(self, shape: ShapeKey) -> tuple:
        """The full cache key: model identity, hardware, parallel config, dtype and bucket."""
        return (self._identity, shape.phase, shape.tokens, shape.requests, shape.context)

    def graphs(self, phase: str) -> GraphFactory:
        """The graph factory (attention grain -> ModelGraph) for ``phase``, built once."""
        if phase not in self._graphs:
            self._graphs[phase] = (self.graphs_for(phase) if self.graphs_for is not None else
                                   templates_graphs(self.model, self.parallel, phase=phase,
                                                    dtype=self.dtype, num_layers=self.num_layers))
        return self._graphs[phase]

    def lookup(self, phase: str, tokens: int, requests: int, context: int) -> Choice | None:
        """The cached decision for a step of this shape, or None (the serving hot path)."""
        if phase not in PHASES:
            raise ConfigError(f"'phase' must be one of {', '.join(PHASES)} (got {phase!r})")
        entry = self.cache.get((self._identity, phase, bucket(tokens), bucket(requests),
                                bucket(context)))
        return entry.choice if entry is not None else None

    def search(self, batch: Batch, phase: str | None = None) -> SearchResult:
        """The search result for ``batch``'s bucket: cached, or searched now and cached."""
        shape = ShapeKey.of_batch(batch, phase)
        key = self.key(shape)
        entry = self.cache.get(key)
        if entry is None:
            result = search(self.model_graph(shape.phase), batch, self.hardware,
                            graphs=self.graphs(shape.phase), attention=self.attention,
                            comm_mode=_comm_mode(shape.phase), micro_counts=self.micro_counts)
            entry = Entry(result.choice, result)
            self.cache.put(key, entry)
        return entry.result

    def plan(self, batch: Batch, phase: str | None = None) -> Plan:
        """The plan for ``batch``: the cached decision of its bucket applied to it (the very
        plan searched when ``batch`` is the batch that filled the bucket)."""
        result = self.search(batch, phase)
        if result.plan.split.batch == batch:
            return result.plan
        choice = result.choice
        shape_phase = phase or ShapeKey.of_batch(batch).phase
        return realise(choice, self.graphs(shape_phase)(choice.attention or self.attention), batch)

    # -- the per-step decision ----------------------------------------------------------------

    def decide(self, batch: Batch | None, phase: str | None = None, *,
               agree: Agree | None = None) -> Decision:
        """The plan this step runs (``Decision.off``: the model's own forward), agreed across
        data-parallel ranks when ``agree`` is given (see ``overlap.search.decision``).

        batch: this rank's batch; None for a rank with nothing to run (it still takes part in
               the agreement, as decode with no tokens).
        """
        if batch is None:
            return self.decide_shape(phase or "decode", 0, 0, 0, agree=agree)
        # From the Batch's cached per-distinct-request figures and prefix sums (each computed
        # once per Batch by C-level passes), not 3 attribute reads per request and step.
        uniques, codes = batch.codes()
        if phase is None:
            phase = "decode" if all(r.is_decode for r in uniques) else "prefill"
        tokens = batch.tokens
        context = batch.prefix_sums()[0][-1] - tokens  # the sums count context + query tokens
        return self.decide_shape(phase, tokens, len(codes), context // len(codes), agree=agree)

    def decide_shape(self, phase: str, tokens: int, requests: int, context: int, *,
                     agree: Agree | None = None) -> Decision:
        """:meth:`decide` from a step's figures (mean context per request): the hot path."""
        if phase not in PHASES:
            raise ConfigError(f"'phase' must be one of {', '.join(PHASES)} (got {phase!r})")
        phase, tb, rb, cb, fewest = agreed(phase, bucket(tokens), bucket(requests),
                                           bucket(context), tokens, agree)
        key = (phase, tb, rb, cb)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decide_cold(key)
        if decision.n_micro > fewest:  # some rank cannot cut its batch that finely: all run off
            return self._off(key, f"a rank has {fewest} token(s), fewer than "
                                  f"{decision.n_micro} microbatches")
        return decision

    def warm(self, batches: list[Batch], phase: str | None = None) -> None:
        """Fully search the buckets of ``batches`` now (e.g. at engine start), so that steps
        meeting them get the full search's choice rather than the cold path's quick one."""
        for batch in batches:
            shape = ShapeKey.of_batch(batch, phase)
            key = (shape.phase, shape.tokens, shape.requests, shape.context)
            self._decide_cold(key, full=True)

    def plan_for(self, decision: Decision, batch: Batch) -> Plan:
        """``decision``'s choice built for exactly ``batch`` (a full-depth build: milliseconds)."""
        if decision.plan.split.batch == batch:
            return decision.plan
        choice = decision.choice
        return realise(choice, self.graphs(decision.key[0])(choice.attention or self.attention),
                       batch)

    def _decide_cold(self, key: tuple, *, full: bool = False) -> Decision:
        phase = key[0]
        batch = canonical(*key)
        if full:
            result = self.search(batch, phase)
        else:
            model = self.model_graph(phase)
            result = quick_search(model, batch, self.hardware, _comm_mode(phase),
                                  present_stages(model))
        decision = Decision(key, result.choice, result.plan, result.step_s, quick=not full)
        self._decisions[key] = decision
        return decision

    def _off(self, key: tuple, reason: str) -> Decision:
        off_key = ("off", *key)
        decision = self._decisions.get(off_key)
        if decision is None:
            choice = Choice(1, "off", named="off")
            plan = realise(choice, self.model_graph(key[0]), canonical(*key))
            decision = Decision(key, choice, plan, float("nan"), quick=True, reason=reason)
            self._decisions[off_key] = decision
        return decision if decision.reason == reason else attrs.evolve(decision, reason=reason)

    def model_graph(self, phase: str) -> ModelGraph:
        """The model at the planner's own attention grain for ``phase``."""
        return self.graphs(phase)(self.attention)


def _comm_mode(phase: str) -> str:
    """Decode uses the low-latency all-to-all (DeepEP's decode kernels), prefill the normal one."""
    return "low_latency" if phase == "decode" else "normal"
