"""``sglang_tbo``: SGLang's two-batch overlap (``--enable-two-batch-overlap``).

SGLang writes a layer as a flat list of operations cut by ``YieldOperation`` markers and steps
two executors, one per microbatch, through the cut stages alternately; the lists of all layers
are concatenated, so a stage can run from one layer into the next. Its DeepSeek strategies
(``batch_overlap/operations_strategy.py``) are the ones from DeepSeek's blog:

- prefill (``tbo_delta_stages=0``): yield after the dispatch is launched and after the combine
  is launched; the shared experts run after the second yield, hiding the combine:

      per microbatch:  attn gate dispatch | experts combine | shared merge + next layer's attn ...
      issue order:     A0 B0 | A1 B1 | A2 B2 ...       (B's stage 2 starts its next layer)

- decode (``tbo_delta_stages=2``): five yields per layer, executor B starts two stages late;
  this is DeepSeek's five-stage decode pipeline, the same order as ``deepseek_decode``.

SGLang picks by forward mode, which all its data-parallel ranks share. Here the choice must not
depend on a rank's own requests either (ranks choosing differently would issue collectives in
different orders and hang), so it follows the graph: the decode order when attention is split
in two stages (``attention="two_stage"``, an op with role ``attn0``) and there are two
microbatches; otherwise the prefill order, round-robin over any number of microbatches.
"""

from __future__ import annotations

from overlap.ops_graph.graph import ModelGraph
from overlap.ops_graph.op import Role
from overlap.plan.plan import Plan
from overlap.plan.split import Split
from overlap.plan.strategies.deepseek import DECODE
from overlap.plan.strategies.engine import build, staggered

HEAD = (("attn0", "attn1", "tp_attn", "gate", "dispatch"), ("experts", "combine"))
TAIL = ("shared", "merge", "tp_ffn")


def sglang_tbo(model: ModelGraph, split: Split) -> Plan:
    """Yield-point stages, alternating between the microbatches' executors."""
    decode = split.n == 2 and any(op.role == Role.ATTN0 for g in model.distinct() for op in g.ops)
    pattern = DECODE if decode else staggered(split.n, HEAD, TAIL)
    return build("sglang_tbo", model, split, pattern,
                 options={"phase": "decode" if decode else "prefill"})
