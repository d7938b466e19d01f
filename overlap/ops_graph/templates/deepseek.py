"""DeepSeek V2/V3/R1 decoder layers: MLA attention, then a dense or a MoE feed-forward.

Attention is declared at the finest grain (MLA's low-rank matmuls apart from the vector work
beside them) and fused into coarser ops on request:

- ``fine``: input_norm, q_a, q_norm, q_b, q_rope, kv_a, kv_prep (kv RMSNorm + rope + KV-cache
  write), in prefill kv_b (the up-projection of every context token's latent) and kv_expand
  (keys and values laid out per head: the nope/value split of kv_b's output, the shared rope key
  copied to every head), core_attn, o_proj; under fp8 a ``<gemm>_quant`` op before each FP8
  GEMM (DeepSeek's inference code quantises per linear layer, so q_a and kv_a cast the same
  input each): what lets a single batch run matrix and vector work on two streams;
- ``two_stage``: ATTN-0 (norm, down/up projections, rope, cache write) and ATTN-1 (core
  attention, o_proj), DeepSeek's decode pipeline stages;
- ``one``: a single attention op.

Prefill computes attention in the "naive" form (kv_b up-projects every cached token); decode
uses the weight-absorbed form (queries projected into the 512-wide latent space, no kv_b op),
as vLLM does.
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

ATTENTION_GRAINS = ("one", "two_stage", "fine")
STAGE0 = ("input_norm", "q_a_quant", "q_a", "q_norm", "q_b_quant", "q_b", "q_proj_quant",
          "q_proj", "q_rope", "kv_a_quant", "kv_a", "kv_prep", "kv_b_quant", "kv_b", "kv_expand")
STAGE1 = ("core_attn", "o_proj_quant", "o_proj")


def mla(b: GraphBuilder, m: ModelConfig, par: ParallelConfig, p: Precision, *,
        absorbed: bool) -> None:
    """MLA at the fine grain: ``hidden, residual -> h, res1``."""
    h, kvr, dn, dr, dv = (m.hidden_size, m.kv_lora_rank, m.qk_nope_head_dim,
                          m.qk_rope_head_dim, m.v_head_dim)
    nh = split_heads(m.num_heads, attention_tp(par))
    b.compute("input_norm", ("hidden", "residual"), ("x", "res1"), cost=add_rms_norm(h),
              role=Role.NORM)
    if m.q_lora_rank:
        qr = m.q_lora_rank
        b.compute("q_a", quantised(b, "q_a", "x", h, p), "q_lat", cost=matmul(h, qr, p),
                  role=Role.MLA_MATRIX)
        b.compute("q_norm", "q_lat", "q_lat_n", cost=rms_norm(qr), role=Role.MLA_VECTOR)
        b.compute("q_b", quantised(b, "q_b", "q_lat_n", qr, p), "q",
                  cost=matmul(qr, nh * (dn + dr), p), role=Role.MLA_MATRIX)
    else:
        b.compute("q_proj", quantised(b, "q_proj", "x", h, p), "q",
                  cost=matmul(h, nh * (dn + dr), p), role=Role.MLA_MATRIX)
    b.compute("q_rope", "q", "q_pe", cost=vector(nh * dr, 3), role=Role.MLA_VECTOR)
    b.compute("kv_a", quantised(b, "kv_a", "x", h, p), "kv_lat", cost=matmul(h, kvr + dr, p),
              role=Role.MLA_MATRIX)
    kv_prep = rms_norm(kvr) + vector(dr, 3) + OpCost(hbm_bytes=Formula(per_token=(kvr + dr) * ACT_BYTES))
    b.compute("kv_prep", "kv_lat", "kv_cache", cost=kv_prep, role=Role.MLA_VECTOR)

    io = nh * (dn + dr + dv) * ACT_BYTES  # read q, write the attention output
    if absorbed:
        kv_b_weights = kvr * nh * (dn + dv) * p.weight_bytes  # absorbed into q and o
        flops = Formula(per_token=2.0 * nh * kvr * (dn + dv), per_pair=2.0 * nh * (2 * kvr + dr))
        hbm = Formula(const=kv_b_weights, per_token=io, per_context=(kvr + dr) * ACT_BYTES)
        keys = "kv_cache"
    else:
        up = nh * (dn + dv)
        kv_b = OpCost(  # the up-projection of every context token's latent, an FP8 GEMM
            flops=Formula(per_context=2.0 * kvr * up),
            hbm_bytes=Formula(const=kvr * up * p.weight_bytes,
                              per_context=kvr * p.dispatch_bytes + up * ACT_BYTES),
            dtype=p.dtype, matrix_outputs=Formula(per_context=up))
        b.compute("kv_b", quantised(b, "kv_b", "kv_cache", kvr, p, per="context"), "kv_up",
                  cost=kv_b, role=Role.MLA_MATRIX)
        # Keys [nope | rope] and values per head (kv_up carries each context token's rope key
        # with its up-projection): read kv_b's output and the rope key, write
        # nh * (dn + dr) key and nh * dv value elements (separate copy kernels, memory bound).
        expand = Formula(per_context=(up + dr + nh * (dn + dr + dv)) * ACT_BYTES)
        b.compute("kv_expand", "kv_up", "kv_heads",
                  cost=OpCost(hbm_bytes=expand), role=Role.MLA_VECTOR)
        flops = Formula(per_pair=2.0 * nh * (dn + dr + dv))
        hbm = Formula(per_token=io, per_context=nh * (dn + dr + dv) * ACT_BYTES)
        keys = "kv_heads"
    # Core attention runs in bf16 whatever the GEMM dtype (FlashAttention-3 and FlashMLA in
    # DeepSeek's FP8 deployment; vllm-ascend's W8A8 keeps attention in bf16 too).
    core = OpCost(flops=flops, vector_flops=Formula(per_pair=4.0 * nh),  # online softmax
                  hbm_bytes=hbm, dtype="bf16")
    b.compute("core_attn", ("q_pe", keys), "attn_o", cost=core, role=Role.ATTN1)
    attention_output(b, par, h, matmul(nh * dv, h, p), Role.ATTN1,
                     src=quantised(b, "o_proj", "attn_o", nh * dv, p))


def coarsen(graph: Graph, attention: str) -> Graph:
    """Fuse the fine MLA ops into ``attention`` grain (``one``, ``two_stage`` or ``fine``)."""
    if attention == "fine":
        return graph
    stage0 = [n for n in STAGE0 if n in graph]
    stage1 = [n for n in STAGE1 if n in graph]
    if attention == "two_stage":
        graph = graph.fuse(stage0, "attn0", role=Role.ATTN0)
        return graph.fuse(stage1, "attn1", role=Role.ATTN1)
    return graph.fuse([*stage0, *stage1], "attn", role=Role.ATTN)


def layer(m: ModelConfig, par: ParallelConfig, *, routed: bool, phase: str, attention: str,
          dtype: str) -> Graph:
    """One DeepSeek decoder layer: ``hidden, residual -> hidden_out, residual_out``."""
    p = Precision.of(dtype)
    b = GraphBuilder(f"{m.name}.{'moe' if routed else 'dense'}", ("hidden", "residual"))
    mla(b, m, par, p, absorbed=phase == "decode")
    post_attention(b, m, routed)
    feed_forward(b, m, par, p, routed=routed)
    return coarsen(b.build(("hidden_out", "residual_out")), attention)
