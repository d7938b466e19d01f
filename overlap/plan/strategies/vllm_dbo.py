"""``vllm_dbo``: upstream vLLM's ``--enable-dbo``.

Two ubatch threads ping-pong: each runs until it launches a collective, then yields to the other.
The shared experts run while the dispatch is in flight, before the routed experts, and the
merge of one ubatch overlaps the other's combine.

    per ubatch:  attn gate dispatch | shared experts combine | merge
    order:       U0 U1 | U0 U1 | U0 U1
"""

from __future__ import annotations

from overlap.ops_graph.graph import ModelGraph
from overlap.plan.plan import Plan
from overlap.plan.split import Split
from overlap.plan.strategies.engine import build, ping_pong

GROUPS = (
    ("attn0", "attn1", "tp_attn", "gate", "dispatch"),
    ("shared", "experts", "combine"),
    ("merge", "tp_ffn"),
)


def vllm_dbo(model: ModelGraph, split: Split) -> Plan:
    """Switch ubatch at every collective launch."""
    return build("vllm_dbo", model, split, ping_pong(split.n, GROUPS))
