"""Qwen3-MoE decoder layers: grouped-query attention, then a MoE feed-forward (no dense layers,
no shared experts), proving the templates and strategies are not DeepSeek-specific.

At the ``fine`` grain attention is input_norm, qkv (matmul), qk_prep (q/k RMSNorm, rope and
KV-cache write: vector work), core_attn, o_proj (under fp8 with ``qkv_quant`` / ``o_proj_quant``
casts before the GEMMs); ``two_stage`` fuses the first three into
``attn0`` and the last two into ``attn1``; ``one`` fuses all of them.
"""

from __future__ import annotations

from overlap.ops_graph.authoring import GraphBuilder
from overlap.ops_graph.cost import Formula, OpCost
from overlap.ops_graph.graph import Graph
from overlap.ops_graph.op import Role
from overlap.ops_graph.templates.common import (
    ACT_BYTES,
    Precision,
    add_rms_norm,
    attention_output,
    attention_tp,
    feed_forward,
    matmul,
    post_attention,
    quantised,
    rms_norm,
    split_heads,
    vector,
)
from overlap.ops_graph.templates.config import ModelConfig, ParallelConfig

STAGE0 = ("input_norm", "qkv_quant", "qkv", "qk_prep")
STAGE1 = ("core_attn", "o_proj_quant", "o_proj")


def gqa(b: GraphBuilder, m: ModelConfig, par: ParallelConfig, p: Precision) -> None:
    """Grouped-query attention at the fine grain: ``hidden, residual -> h, res1``."""
    h, hd = m.hidden_size, m.head_dim
    tp = attention_tp(par)
    nh = split_heads(m.num_heads, tp)
    nkv = max(1, m.num_kv_heads // tp)  # kv heads are replicated when tp > num_kv_heads
    b.compute("input_norm", ("hidden", "residual"), ("x", "res1"), cost=add_rms_norm(h),
              role=Role.NORM)
    b.compute("qkv", quantised(b, "qkv", "x", h, p), "qkv_out",
              cost=matmul(h, (nh + 2 * nkv) * hd, p), role=Role.MLA_MATRIX)
    prep = rms_norm((nh + nkv) * hd) + vector((nh + nkv) * hd, 3) + OpCost(
        hbm_bytes=Formula(per_token=2 * nkv * hd * ACT_BYTES))
    b.compute("qk_prep", "qkv_out", ("q_pe", "kv_cache"), cost=prep, role=Role.MLA_VECTOR)
    core = OpCost(
        flops=Formula(per_pair=4.0 * nh * hd),
        vector_flops=Formula(per_pair=4.0 * nh),
        hbm_bytes=Formula(per_token=2 * nh * hd * ACT_BYTES, per_context=2 * nkv * hd * ACT_BYTES),
        dtype=p.dtype,
    )
    b.compute("core_attn", ("q_pe", "kv_cache"), "attn_o", cost=core, role=Role.ATTN1)
    attention_output(b, par, h, matmul(nh * hd, h, p), Role.ATTN1,
                     src=quantised(b, "o_proj", "attn_o", nh * hd, p))


def coarsen(graph: Graph, attention: str) -> Graph:
    """Fuse the fine attention ops into ``attention`` grain."""
    stage0, stage1 = ([n for n in stage if n in graph] for stage in (STAGE0, STAGE1))
    if attention == "two_stage":
        return graph.fuse(stage0, "attn0", role=Role.ATTN0).fuse(stage1, "attn1", role=Role.ATTN1)
    if attention == "one":
        return graph.fuse([*stage0, *stage1], "attn", role=Role.ATTN)
    return graph


def layer(m: ModelConfig, par: ParallelConfig, *, routed: bool, phase: str, attention: str,
          dtype: str) -> Graph:
    """One Qwen3-MoE decoder layer: ``hidden, residual -> hidden_out, residual_out``."""
    p = Precision.of(dtype)
    b = GraphBuilder(f"{m.name}.{'moe' if routed else 'dense'}", ("hidden", "residual"))
    gqa(b, m, par, p)
    post_attention(b, m, routed)
    feed_forward(b, m, par, p, routed=routed)
    return coarsen(b.build(("hidden_out", "residual_out")), attention)
