"""DeepSeek's published prefill and decode overlap schedules (two microbatches).

Microbatch 1 runs half a layer behind microbatch 0, so the tail of its previous layer (``L-1``)
overlaps the head of microbatch 0's current layer.

Prefill — the combine of the previous layer overlaps the attention of the next:

    compute: ATTN(0) SHARED(1,L-1) ATTN(1) EXPERTS(0) EXPERTS(1) SHARED(0)
    comm:        COMBINE(1,L-1)  DISPATCH(0) DISPATCH(1)  COMBINE(0)

Decode — attention in two stages (ATTN-0: projections; ATTN-1: core attention) makes a
five-stage pipeline ATTN-0, ATTN-1, DISPATCH, MLP, COMBINE in which each microbatch's
communication hides behind the other's computation:

    compute: ATTN0(0) MLP(1,L-1) ATTN1(0) ATTN0(1) MLP(0) ATTN1(1)
    comm:            COMBINE(1,L-1) DISPATCH(0)  COMBINE(0) DISPATCH(1)
"""

from __future__ import annotations

from overlap.errors import ConfigError
from overlap.ops_graph.graph import ModelGraph
from overlap.plan.plan import Plan
from overlap.plan.split import Split
from overlap.plan.stages import STAGES
from overlap.plan.strategies.engine import build, ping_pong

HEAD = ("attn0", "attn1", "tp_attn", "gate")
TAIL = ("merge", "tp_ffn")

PREFILL = [
    *[(0, 0, s) for s in HEAD],
    (1, 1, "combine"),
    (0, 0, "dispatch"),
    (1, 1, "shared"),
    *[(1, 1, s) for s in TAIL],
    *[(0, 1, s) for s in HEAD],
    (0, 1, "dispatch"),
    (0, 0, "experts"),
    (0, 1, "experts"),
    (0, 0, "combine"),
    (0, 0, "shared"),
    *[(0, 0, s) for s in TAIL],
]

DECODE = [
    (0, 0, "attn0"),
    (1, 1, "experts"),
    (1, 1, "shared"),
    (1, 1, "combine"),
    (0, 0, "attn1"), (0, 0, "tp_attn"), (0, 0, "gate"),
    (0, 0, "dispatch"),
    *[(1, 1, s) for s in TAIL],
    (0, 1, "attn0"),
    (0, 0, "experts"),
    (0, 0, "shared"),
    (0, 0, "combine"),
    (0, 1, "attn1"), (0, 1, "tp_attn"), (0, 1, "gate"),
    (0, 1, "dispatch"),
    *[(0, 0, s) for s in TAIL],
]


def _two(name: str, model: ModelGraph, split: Split, pattern: list) -> Plan:
    if split.n == 1:  # the split was refused: nothing to pipeline, run it whole
        return build(name, model, split, ping_pong(1, [STAGES]), options={"fallback": split.reason})
    if split.n != 2:
        raise ConfigError(f"strategy {name!r} needs 2 microbatches (got {split.n})")
    return build(name, model, split, pattern)


def deepseek_prefill(model: ModelGraph, split: Split) -> Plan:
    """DeepSeek's prefill overlap: previous layer's combine under the next layer's attention."""
    return _two("deepseek_prefill", model, split, PREFILL)


def deepseek_decode(model: ModelGraph, split: Split) -> Plan:
    """DeepSeek's five-stage decode pipeline (build the graph with ``attention="two_stage"``)."""
    return _two("deepseek_decode", model, split, DECODE)
