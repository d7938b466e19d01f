"""The built-in strategies: small functions from (model graph, split) to a Plan.

``build_plan(name, model, split)`` looks one up, builds and validates its plan. Every strategy is
generic over graphs: it orders the stages of ``overlap.plan.stages``, not a model's ops.
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
from overlap.plan.strategies.auto import auto
from overlap.plan.strategies.deepseek import deepseek_decode, deepseek_prefill
from overlap.plan.strategies.engine import with_vector_stream
from overlap.plan.strategies.multistream_mla import ascend_multistream_mla
from overlap.plan.strategies.sequential import sequential
from overlap.plan.strategies.sglang_tbo import sglang_tbo
from overlap.plan.strategies.vllm_dbo import vllm_dbo
from overlap.plan.validate import validate

Strategy = Callable[[ModelGraph, Split], Plan]

STRATEGIES: Mapping[str, Strategy] = MappingProxyType({
    "sequential": sequential,
    "ascend_dbo": ascend_dbo,
    "sglang_tbo": sglang_tbo,
    "vllm_dbo": vllm_dbo,
    "deepseek_prefill": deepseek_prefill,
    "deepseek_decode": deepseek_decode,
    "ascend_multistream_mla": ascend_multistream_mla,
    "auto": auto,
})

# Strategies that overlap microbatches (and so want a split of 2).
MICROBATCHED = ("ascend_dbo", "sglang_tbo", "vllm_dbo", "deepseek_prefill", "deepseek_decode")


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name``; an unknown name lists the valid ones."""
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
    plan = get_strategy(name)(model, split)
    if multistream_mla and name != "ascend_multistream_mla":
        plan = attrs.evolve(with_vector_stream(plan), strategy=f"{plan.strategy}+multistream_mla")
    return validate(plan) if check else plan


__all__ = ["MICROBATCHED", "STRATEGIES", "build_plan", "get_strategy"]
