"""``ascend_dbo``: vllm-ascend's dual-batch overlap for DeepSeek (``models/deepseek_dbo.py``,
shipped mid-2025 and since removed).

All computation on one stream, every collective on a communication stream, each block of the
layer issued for microbatch 0 and then for 1, so one microbatch's collective runs while the
other computes. It had two forms:

- tensor-parallel (``_forward_ms_layer``): attention and its all-reduce; post-attention norm and
  the shared experts; then gate, experts and the FFN all-reduce (or all-gather) per microbatch:

      attn(0) attn(1) | gate shared(0) gate shared(1) | experts merge(0) experts merge(1)
            tp_attn(0) tp_attn(1)                             tp_ffn(0)        tp_ffn(1)

- expert-parallel all-to-all (``_forward_ms_layer_alltoallv_finegrained``): attention, gate and
  shared experts, then the dispatch; then experts and the combine:

      attn gate shared(0) attn gate shared(1) | experts(0)  experts(1)
                 dispatch(0)        dispatch(1)     combine(0)  combine(1)

The form follows the model: any all-to-all collective selects the second.
"""

from __future__ import annotations

from overlap.ops_graph.graph import ModelGraph
from overlap.ops_graph.op import Collective, OpKind
from overlap.plan.plan import Plan
from overlap.plan.split import Split
from overlap.plan.strategies.engine import build, ping_pong

TP_FORM = (("attn0", "attn1", "tp_attn"), ("gate", "dispatch", "shared"),
           ("experts", "combine", "merge", "tp_ffn"))
EP_FORM = (("attn0", "attn1", "tp_attn", "gate", "shared", "dispatch"),
           ("experts", "combine", "merge", "tp_ffn"))


def uses_all_to_all(model: ModelGraph) -> bool:
    """Whether any layer moves tokens with an all-to-all (expert parallelism)."""
    return any(op.kind is OpKind.COMM and op.comm.collective is Collective.ALL_TO_ALL
               for graph in model.distinct() for op in graph.ops)


def ascend_dbo(model: ModelGraph, split: Split) -> Plan:
    """Block-by-block alternation of the microbatches; compute and comm on two streams."""
    form = "ep" if uses_all_to_all(model) else "tp"
    groups = EP_FORM if form == "ep" else TP_FORM
    return build("ascend_dbo", model, split, ping_pong(split.n, groups), options={"form": form})
