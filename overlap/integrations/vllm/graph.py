"""The ops graph of a vLLM DeepSeek decoder layer, at the grain vLLM 0.32 lets us cut it.

    attn            input RMSNorm + MLA (q/kv projections, rope, KV-cache write, core
                    attention, o_proj)                                   role attn
    attn_allreduce  o_proj's tensor-parallel all-reduce (tp > 1 only)    comm, role tp_comm
    post_norm       post-attention RMSNorm (+ residual add)              role norm
    experts         MoE layers: router gate, routed experts, shared experts and their sum,
                    all inside vLLM's ``MoERunner``                       role experts
    mlp             dense layers: the SwiGLU MLP                          role mlp
    ffn_allreduce   the feed-forward's tensor-parallel all-reduce (tp > 1 only)

Why this grain: vLLM's fused-MoE runner performs gate, dispatch, experts, shared experts and
combine in one private method, so they cannot be issued separately without re-implementing it;
only its final all-reduce can be deferred cleanly (see ``adapter``). MLA's projections and core
attention are likewise one module call. Torch- and vLLM-free, so the graphs are unit-tested.
"""

from __future__ import annotations

from overlap.ops_graph.authoring import GraphBuilder
from overlap.ops_graph.graph import Graph
from overlap.ops_graph.op import Collective, Role

INPUTS = ("hidden", "residual")
OUTPUTS = ("hidden_out", "residual_out")


def layer_graph(*, moe: bool, tp: int) -> Graph:
    """One decoder layer: ``hidden, residual -> hidden_out, residual_out``.

    With ``tp > 1`` the two tensor-parallel all-reduces are separate communication ops.
    """
    b = GraphBuilder(f"deepseek.{'moe' if moe else 'dense'}{'.tp' if tp > 1 else ''}", INPUTS)
    if tp > 1:
        b.compute("attn", INPUTS, ("h_partial", "res1"), role=Role.ATTN)
        b.comm("attn_allreduce", Collective.ALL_REDUCE, "tp", "h_partial", "h", size=tp,
               role=Role.TP_COMM)
    else:
        b.compute("attn", INPUTS, ("h", "res1"), role=Role.ATTN)
    b.compute("post_norm", ("h", "res1"), ("ffn_in", "residual_out"), role=Role.NORM)
    ffn_out = "ffn_partial" if tp > 1 else "hidden_out"
    if moe:
        b.compute("experts", "ffn_in", ffn_out, role=Role.EXPERTS)
    else:
        b.compute("mlp", "ffn_in", ffn_out, role=Role.MLP)
    if tp > 1:
        b.comm("ffn_allreduce", Collective.ALL_REDUCE, "tp", "ffn_partial", "hidden_out", size=tp,
               role=Role.TP_COMM)
    return b.build(OUTPUTS)
