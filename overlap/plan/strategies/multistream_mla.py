"""``ascend_multistream_mla``: no microbatching; MLA's vector work on a second compute stream.

On Ascend the cube (matrix) and vector cores are separate units that run at the same time. With
attention at the ``fine`` grain, q RMSNorm, rope and the kv RMSNorm + rope + KV-cache write run on
a ``vector`` stream beside the q/kv matmuls (vllm-ascend shipped this as multistream MLA for
decode):

    compute: input_norm q_a kv_a q_b core_attn o_proj ...
    vector:            q_norm kv_prep q_rope

Any other strategy composes with it: ``build_plan(name, ..., multistream_mla=True)``.
"""

from __future__ import annotations

from overlap.ops_graph.graph import ModelGraph
from overlap.plan.plan import DEFAULT_STREAMS, Plan
from overlap.plan.split import Split, unsplit
from overlap.plan.strategies.engine import build, in_order, with_vector_stream


def ascend_multistream_mla(model: ModelGraph, split: Split) -> Plan:
    """The unsplit batch in order, MLA vector ops on their own stream."""
    return with_vector_stream(build("ascend_multistream_mla", model, unsplit(split),
                                    in_order(1), streams=DEFAULT_STREAMS))
