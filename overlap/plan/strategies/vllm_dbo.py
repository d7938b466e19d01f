"""``vllm_dbo``: upstream vLLM's dual-batch overlap (``--enable-dbo``).

Two ubatch threads take turns on the host (``v1/worker/ubatching.py``); a thread yields to the
other right after it launches a collective. The yield points sit in the modular fused-MoE kernel
(``FusedMoEModularKernel._prepare`` / ``_finalize``): after the dispatch is launched, and after
the combine is launched and the shared experts are issued behind it. So the shared experts hide
the combine, and the merge (plus the next layer's attention) runs while the other ubatch's
combine is in flight:

    per ubatch:  attn gate dispatch | experts combine shared | merge + next layer's attn ...
    issue order: U0 U1 | U0 U1 | U0 U1 ...
"""

from __future__ import annotations

from overlap.ops_graph.graph import ModelGraph
from overlap.plan.plan import Plan
from overlap.plan.split import Split
from overlap.plan.strategies.engine import build, staggered

HEAD = (("attn0", "attn1", "tp_attn", "gate", "dispatch"), ("experts", "combine", "shared"))
TAIL = ("merge", "tp_ffn")


def vllm_dbo(model: ModelGraph, split: Split) -> Plan:
    """Switch ubatch at every collective launch."""
    return build("vllm_dbo", model, split, staggered(split.n, HEAD, TAIL))
