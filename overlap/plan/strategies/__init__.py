"""The built-in strategies, one :class:`Strategy` record each.

A record says everything the rest of the project needs to know about a strategy: how it builds a
plan from (model graph, split), the microbatch counts it accepts, the attention grain it was
written for, a one-line summary and the source it follows. The CLI help, the docs tables, the
vLLM config's checks and the tests' parametrisation are all derived from :data:`STRATEGIES`.

``build_plan(name, model, split)`` looks one up, builds and validates its plan. Every strategy is
generic over graphs: it orders the stages of ``overlap.plan.stages``, not a model's ops.

``auto`` is listed too, but it is a search, not a function of (graph, split): it needs hardware
to score candidates on, so its record has no ``build`` and ``overlap.search`` implements it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import attrs

from overlap.errors import ConfigError, suggest
from overlap.ops_graph.graph import ModelGraph
from overlap.plan.plan import Plan
from overlap.plan.split import Split
from overlap.plan.strategies.ascend_dbo import ascend_dbo
from overlap.plan.strategies.chunked import chunked_experts, single_batch
from overlap.plan.strategies.deepseek import deepseek_decode, deepseek_prefill
from overlap.plan.strategies.engine import with_vector_stream
from overlap.plan.strategies.multistream_mla import ascend_multistream_mla
from overlap.plan.strategies.sequential import off, sequential
from overlap.plan.strategies.sglang_tbo import sglang_tbo
from overlap.plan.strategies.vllm_dbo import vllm_dbo
from overlap.plan.validate import validate

Builder = Callable[[ModelGraph, Split], Plan]
GRAINS = ("one", "two_stage", "fine")


@attrs.frozen
class Strategy:
    """One strategy and what is known about it.

    name:             the name users pass (``--strategy``, the vLLM config).
    build:            ``(model, split) -> Plan`` (unvalidated); None for ``auto`` (a search).
    microbatch_counts: the split sizes it overlaps; a split of 1 (a refused split) is always run
                      whole. The first count above 1, else 1, is the one to split a batch into.
    grain:            the attention grain (``ops_graph.templates``) it was written for.
    summary:          one line: what it does.
    source:           where it comes from (a system and file, or a paper).
    """

    name: str
    build: Builder | None = attrs.field(eq=False)
    microbatch_counts: tuple[int, ...] = attrs.field(converter=tuple)
    grain: str = attrs.field(validator=attrs.validators.in_(GRAINS))
    summary: str
    source: str

    @microbatch_counts.validator
    def _check_counts(self, attribute: attrs.Attribute, value: tuple[int, ...]) -> None:
        if not value or any(n < 1 for n in value):
            raise ConfigError(f"'microbatch_counts' must be non-empty counts >= 1 (got {value})")

    @property
    def microbatches(self) -> int:
        """The microbatch count to split a batch into for this strategy."""
        return next((n for n in self.microbatch_counts if n > 1), 1)

    @property
    def microbatched(self) -> bool:
        """Whether it overlaps several microbatches (rather than ops of one batch)."""
        return self.microbatches > 1


_ANY = (2, 3, 4)
_RECORDS = (
    Strategy("sequential", sequential, (1,), "one",
             "the plain forward on one stream: the baseline", "every inference engine"),
    Strategy("ascend_dbo", ascend_dbo, _ANY, "one",
             "block-by-block alternation of the microbatches, compute and comm on two streams",
             "vllm-ascend models/deepseek_dbo.py (2025, since removed)"),
    Strategy("sglang_tbo", sglang_tbo, _ANY, "one",
             "yield-point stages alternating between two executors (decode: 5-stage pipeline)",
             "SGLang two-batch overlap, srt/batch_overlap/operations_strategy.py"),
    Strategy("vllm_dbo", vllm_dbo, _ANY, "one",
             "ubatch threads that switch at every collective launch",
             "vLLM --enable-dbo, v1/worker/ubatching.py and the modular fused-MoE kernel"),
    Strategy("deepseek_prefill", deepseek_prefill, (2,), "one",
             "combine under the other microbatch's attention, shared experts under own combine",
             "DeepSeek profile-data README (prefill figure)"),
    Strategy("deepseek_decode", deepseek_decode, (2,), "two_stage",
             "five-stage decode pipeline over two-stage attention",
             "DeepSeek profile-data README (decode figure)"),
    Strategy("ascend_multistream_mla", ascend_multistream_mla, (1,), "fine",
             "no microbatching; MLA vector ops on a second compute stream",
             "vllm-ascend multistream MLA (decode)"),
    Strategy("single_batch", single_batch, (1,), "one",
             "one microbatch: shared experts under the dispatch, the routed output combined in "
             "4 chunks as the experts finish",
             "SGLang single-batch overlap, srt/batch_overlap/single_batch_overlap.py"),
    Strategy("chunked_experts", chunked_experts, (1,), "one",
             "one microbatch: dispatch, experts and combine in 4 rounds of a quarter of the "
             "local experts",
             "Tutel pipelined all-to-all (MLSys 2023); SGLang per-expert overlap"),
    Strategy("off", off, (1,), "one",
             "overlap off: the model's own forward (the plain order, run without the executor)",
             "any engine with overlap disabled"),
    Strategy("auto", None, (1, 2, 3, 4), "one",
             "search of the schedule space scored by the simulator on given hardware",
             "this project (overlap.search)"),
)

STRATEGIES: Mapping[str, Strategy] = MappingProxyType({s.name: s for s in _RECORDS})
NAMED: tuple[str, ...] = tuple(s.name for s in _RECORDS if s.build is not None)
"""The strategies that are functions of (graph, split): all but the searched ``auto``."""


def get_strategy(name: str) -> Strategy:
    """The strategy record called ``name``; an unknown name lists the valid ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}{suggest(name, STRATEGIES)}; "
                          f"valid: {', '.join(STRATEGIES)}") from None


def build_plan(name: str, model: ModelGraph, split: Split, *, multistream_mla: bool = False,
               check: bool = True) -> Plan:
    """Build strategy ``name``'s plan and validate it.

    multistream_mla: also move MLA's vector ops (role ``mla_vector``, present when the graph was
                     built with ``attention="fine"``) to a second compute stream.
    """
    strategy = get_strategy(name)
    if strategy.build is None:
        raise ConfigError(f"strategy {name!r} is a search and needs hardware to score plans on: "
                          "use overlap.search.search(model, batch, hardware) or "
                          "overlap.search.Planner(model, hardware=...)")
    plan = strategy.build(model, split)
    if multistream_mla and name != "ascend_multistream_mla":
        plan = attrs.evolve(with_vector_stream(plan), strategy=f"{plan.strategy}+multistream_mla")
    return validate(plan) if check else plan


__all__ = ["GRAINS", "NAMED", "STRATEGIES", "Strategy", "build_plan", "get_strategy"]
