"""``ascend_dbo``: vllm-ascend's dual-batch overlap.

Two microbatches; all computation on one stream, all communication on another; the microbatches
alternate stage by stage, so one microbatch's collective runs while the other computes. It works
unchanged on the EP form (dispatch/combine all-to-all) and the TP form (all-gather /
reduce-scatter or all-reduce), because TP collectives are stages too.

    compute: attn(0) attn(1) experts(0) experts(1) shared(0) shared(1) merge(0) merge(1)
    comm:        tp/dispatch(0) dispatch(1)  combine(0) combine(1)
"""

from __future__ import annotations

from overlap.ops_graph.graph import ModelGraph
from overlap.plan.plan import Plan
from overlap.plan.split import Split
from overlap.plan.stages import STAGES
from overlap.plan.strategies.engine import build, ping_pong


def ascend_dbo(model: ModelGraph, split: Split) -> Plan:
    """Stage-by-stage alternation of the microbatches; compute and comm on two streams."""
    return build("ascend_dbo", model, split, ping_pong(split.n, [(s,) for s in STAGES]))
