"""``sglang_tbo``: SGLang's two-batch overlap.

A layer is a flat list of operations cut by yield points at each communication; two executors
(one per microbatch) step through the cut stages alternately. The shared experts sit after the
combine is launched, so they overlap it.

    stages per microbatch:  attn gate dispatch | experts combine | shared merge
    order:                  A0 A1 | B0 B1 | C0 C1   (stage, then microbatch)
"""

from __future__ import annotations

from overlap.ops_graph.graph import ModelGraph
from overlap.plan.plan import Plan
from overlap.plan.split import Split
from overlap.plan.strategies.engine import build, ping_pong

GROUPS = (
    ("attn0", "attn1", "tp_attn", "gate", "dispatch"),
    ("experts", "combine"),
    ("shared", "merge", "tp_ffn"),
)


def sglang_tbo(model: ModelGraph, split: Split) -> Plan:
    """Yield-point stages, alternating between the microbatches' executors."""
    return build("sglang_tbo", model, split, ping_pong(split.n, GROUPS))
