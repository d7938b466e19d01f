"""Cost building blocks and the MoE feed-forward block shared by every template.

All figures are per rank and per microbatch. Formulas count multiply-adds as two FLOPs, weights
as read once per op call (so splitting a batch into microbatches re-reads them, as real kernels
do), and activations as read and written once. Vector work (norms, rotary embedding,
activations, routing) is an estimate in element operations; docs/ops_graph.md lists each figure.

Under ``fp8`` every FP8 GEMM reads an activation that a ``<gemm>_quant`` op cast to FP8 first
(per-token 1x128 blocks with an fp32 scale each, as DeepSeek-V3 and DeepGEMM do): a separate,
memory-bound kernel in every FP8 deployment, so an op of its own rather than bytes the GEMM's
roofline would hide. The routed experts run between a ``permute`` (rows into expert order) and an
``unpermute`` (the weighted sum back into token order), memory-bound kernels of their own too.
"""

from __future__ import annotations

import attrs

from overlap.errors import ConfigError
from overlap.ops_graph.authoring import GraphBuilder
from overlap.ops_graph.cost import DTYPES, Formula, OpCost
from overlap.ops_graph.op import Collective, Role, Routing
from overlap.ops_graph.templates.config import ModelConfig, ParallelConfig

ACT_BYTES = 2  # activations stay bf16 between ops, whatever the GEMM dtype
SCALE_BYTES = 4 / 128  # FP8 activations carry one fp32 scale per 1x128 block (DeepSeek-V3 3.3.2)


@attrs.frozen
class Precision:
    """Bytes per element for weights and for the dispatch payload under a GEMM dtype."""

    dtype: str
    weight_bytes: int
    dispatch_bytes: int

    @classmethod
    def of(cls, dtype: str) -> Precision:
        if dtype not in DTYPES:
            raise ConfigError(f"'dtype' must be one of {', '.join(DTYPES)} (got {dtype!r})")
        one = 1 if dtype in ("int8", "fp8") else 2  # W8A8: 8-bit weights and dispatched tokens
        return cls(dtype, weight_bytes=one, dispatch_bytes=one)


def matmul(k: int, n: int, p: Precision, *, rows: float = 1.0) -> OpCost:
    """``y[T, n] = x[T, k] @ W[k, n]`` applied to ``rows`` rows per token."""
    return OpCost(
        flops=Formula(per_token=2.0 * k * n * rows),
        hbm_bytes=Formula(const=k * n * p.weight_bytes, per_token=(k + n) * ACT_BYTES * rows),
        dtype=p.dtype,
        matrix_outputs=Formula(per_token=n * rows),
    )


def quant(width: float, *, per: str = "token") -> OpCost:
    """Cast ``width`` bf16 elements (per token, or per ``context`` token) to FP8 with block
    scales: read 2 bytes, write 1 + 4/128 per element; abs-max, scale and convert (3 ops)."""
    return OpCost(vector_flops=Formula(**{f"per_{per}": 3.0 * width}),
                  hbm_bytes=Formula(**{f"per_{per}": width * (ACT_BYTES + 1 + SCALE_BYTES)}))


def quantised(b: GraphBuilder, gemm: str, src: str, width: float, p: Precision, *,
              per: str = "token") -> str:
    """The value FP8 GEMM ``gemm`` reads: ``src`` cast by a ``<gemm>_quant`` op under fp8 (other
    dtypes read ``src`` itself: bf16 needs no cast, and W8A8's int8 cast is not modelled)."""
    if p.dtype != "fp8":
        return src
    out = f"{gemm}_in"
    b.compute(f"{gemm}_quant", src, out, cost=quant(width, per=per), role=Role.QUANT)
    return out


def vector(width: int, ops_per_element: float, *, rw: int = 2) -> OpCost:
    """Element-wise work over ``width`` elements per token, each read/written ``rw`` times."""
    return OpCost(
        vector_flops=Formula(per_token=width * ops_per_element),
        hbm_bytes=Formula(per_token=width * ACT_BYTES * rw),
    )


def rms_norm(width: int) -> OpCost:
    """RMSNorm (square, sum, rsqrt, scale, weight): about 4 element ops, 1 read + 1 write."""
    return vector(width, 4)


def add_rms_norm(width: int) -> OpCost:
    """Residual add + RMSNorm (vLLM's fused_add_rms_norm): read the input and the residual,
    write the normalised value and the new residual."""
    return vector(width, 5, rw=4)


def comm(payload_bytes_per_token: float) -> OpCost:
    """A collective moving ``payload_bytes_per_token`` per token from this rank."""
    return OpCost(comm_bytes=Formula(per_token=payload_bytes_per_token),
                  hbm_bytes=Formula(per_token=2 * payload_bytes_per_token))


def ffn(hidden: int, inner: int, p: Precision, *, rows: float = 1.0) -> OpCost:
    """A SwiGLU feed-forward (gate, up, down projections) applied to ``rows`` rows per token."""
    up = matmul(hidden, 2 * inner, p, rows=rows)
    down = matmul(inner, hidden, p, rows=rows)
    act = OpCost(vector_flops=Formula(per_token=4.0 * inner * rows))  # SiLU(g) * u
    return up + down + act


def routed_experts(m: ModelConfig, p: Precision, *, experts: int, inner: int, rows: float,
                   hit: float) -> OpCost:
    """Routed experts: ``rows`` expert rows per token; the weights of ``experts`` local experts
    are read when at least one token routes to them (probability ``hit`` per token)."""
    work = ffn(m.hidden_size, inner, p, rows=rows)
    weights = 3.0 * m.hidden_size * inner * p.weight_bytes
    return OpCost(
        flops=work.flops,
        vector_flops=work.vector_flops,
        hbm_bytes=Formula(per_token=work.hbm_bytes.per_token, saturating=experts * weights,
                          hit=hit),
        dtype=p.dtype,
        matrix_outputs=work.matrix_outputs,
    )


def permute(h: int, p: Precision, *, rows_in: float, rows_out: float) -> OpCost:
    """Rows into expert order: read ``rows_in`` rows per token (a received or local token once),
    write ``rows_out`` (one per (token, local expert)), at the GEMM input's element size (FP8
    with its scales under fp8); the index arrays are a few bytes per row."""
    row = h * p.dispatch_bytes + (h * SCALE_BYTES if p.dtype == "fp8" else 0)
    return OpCost(vector_flops=Formula(per_token=8.0 * rows_out),
                  hbm_bytes=Formula(per_token=(rows_in + rows_out) * row + 16.0 * rows_out))


def unpermute(h: int, *, rows_in: float, rows_out: float) -> OpCost:
    """The weighted sum back into token order: read ``rows_out`` bf16 expert rows and their
    weights, write ``rows_in`` rows (one per token and rank)."""
    return OpCost(vector_flops=Formula(per_token=2.0 * h * rows_out),
                  hbm_bytes=Formula(per_token=(rows_in + rows_out) * h * ACT_BYTES + 4.0 * rows_out))


def ranks_reached(m: ModelConfig, ep: int) -> float:
    """Expected number of the ``ep`` ranks a token's top-k experts sit on (experts split evenly,
    chosen without replacement): the rows a rank receives per token of its own."""
    local, total, k = m.n_routed_experts // ep, m.n_routed_experts, m.num_experts_per_tok
    miss = 1.0
    for i in range(k):
        miss *= max(total - local - i, 0) / (total - i)
    return ep * (1.0 - miss)


def post_attention(b: GraphBuilder, m: ModelConfig, routed: bool) -> None:
    """Post-attention RMSNorm (+ router gate and top-k on MoE layers): ``h, res1 -> moe_in, ...``."""
    h = m.hidden_size
    if routed:
        # Routing (sigmoid, bias, group-limited top-k, weights) is part of the gate op: one fused
        # kernel in inference engines (vLLM's grouped_topk), a few vector ops per expert score.
        router = matmul(h, m.n_routed_experts, Precision.of("bf16"))  # router stays in bf16
        topk = OpCost(vector_flops=Formula(per_token=8.0 * m.n_routed_experts))  # sigmoid, bias, top-k
        b.compute("gate", ("h", "res1"), ("moe_in", "residual_out", "topk"),
                  cost=add_rms_norm(h) + router + topk, role=Role.GATE)
    else:
        b.compute("post_norm", ("h", "res1"), ("moe_in", "residual_out"), cost=add_rms_norm(h),
                  role=Role.NORM)


def feed_forward(b: GraphBuilder, m: ModelConfig, par: ParallelConfig, p: Precision, *,
                 routed: bool) -> None:
    """The layer's feed-forward half, ``moe_in[, topk] -> hidden_out``, with its communication.

    Expert parallel (``all_to_all``): dispatch, permute, routed experts, unpermute, combine;
    shared experts run beside them on the undispatched tokens (every mode permutes around the
    routed experts; under fp8 ``ffn_quant`` casts the input first). Tensor parallel
    (``all_reduce``): every rank holds a slice of every expert, and the partial sums are
    all-reduced. ``all_gather``: tokens are all-gathered over the tp group first and the partial
    sums reduce-scattered back.
    """
    h, k = m.hidden_size, m.num_experts_per_tok
    mode = par.moe_comm if routed else ("all_reduce" if par.tp > 1 else "none")
    if par.tp == 1 and par.ep == 1:
        mode = "none"  # a single rank: every expert is local, nothing to communicate
    if not routed and par.moe_comm == "all_gather" and par.tp > 1:
        mode = "all_gather"
    tp = par.tp if mode in ("all_reduce", "all_gather") else 1
    gathered = tp if mode == "all_gather" else 1  # rows per local token after the all-gather
    src = "moe_in_all" if mode == "all_gather" else "moe_in"
    topk = "topk_all" if mode == "all_gather" else "topk"
    if mode == "all_gather":
        reads = ("moe_in", "topk") if routed else ("moe_in",)
        writes = ("moe_in_all", "topk_all") if routed else ("moe_in_all",)
        b.comm("ffn_gather", Collective.ALL_GATHER, "tp", reads, writes, size=tp,
               cost=comm(h * ACT_BYTES + (8 * k if routed else 0)), role=Role.TP_COMM)
    out = "hidden_out" if mode in ("none", "all_to_all") else "ffn_partial"
    # One cast of the FFN input serves the dispatch (FP8 payload) and every expert GEMM; the
    # SwiGLU output's cast before each down projection is fused into the activation kernel.
    ffn_in = quantised(b, "ffn", src, h * gathered, p)

    if not routed:
        b.compute("mlp", ffn_in, out, cost=ffn(h, m.intermediate_size // tp, p, rows=gathered),
                  role=Role.MLP)
    else:
        # Without shared experts the routed result is the block's output: no merge op.
        routed_out = "routed" if m.n_shared_experts else out
        if mode == "all_to_all":
            ep = par.ep
            routing = Routing(k, m.n_routed_experts, m.n_group, m.topk_group)
            b.comm("dispatch", Collective.ALL_TO_ALL, "ep", (ffn_in, "topk"), "recv", size=ep,
                   cost=comm(k * h * p.dispatch_bytes), role=Role.DISPATCH, routing=routing)
            hit = 1.0 - (1.0 - k / m.n_routed_experts) ** ep  # a local token's share of hits
            rows_in, expert_in, unpermuted = ranks_reached(m, ep), ("recv",), "expert_out"
            experts, inner = -(-m.n_routed_experts // ep), m.moe_intermediate_size
        else:
            hit = 1.0 - (1.0 - k / m.n_routed_experts) ** gathered
            rows_in, expert_in, unpermuted = gathered, (ffn_in, topk), routed_out
            experts, inner = m.n_routed_experts, m.moe_intermediate_size // tp
        rows = k * gathered  # (token, expert) rows per local token, whatever the parallelism
        b.compute("permute", expert_in, "permuted", role=Role.PERMUTE,
                  cost=permute(h, p, rows_in=rows_in, rows_out=rows))
        b.compute("experts", "permuted", "expert_rows", role=Role.EXPERTS,
                  cost=routed_experts(m, p, experts=experts, inner=inner, rows=rows, hit=hit))
        b.compute("unpermute", "expert_rows", unpermuted, role=Role.PERMUTE,
                  cost=unpermute(h, rows_in=rows_in, rows_out=rows))
        if mode == "all_to_all":
            b.comm("combine", Collective.ALL_TO_ALL, "ep", "expert_out", routed_out, size=ep,
                   cost=comm(k * h * ACT_BYTES), role=Role.COMBINE, routing=routing)
        if m.n_shared_experts:
            inner = m.n_shared_experts * m.moe_intermediate_size // tp
            b.compute("shared", ffn_in, "shared_out", cost=ffn(h, inner, p, rows=gathered),
                      role=Role.SHARED)
            merge = OpCost(vector_flops=Formula(per_token=2.0 * h * gathered),
                           hbm_bytes=Formula(per_token=3.0 * h * ACT_BYTES * gathered))
            b.compute("merge", ("routed", "shared_out"), out, cost=merge, role=Role.MERGE)

    if mode == "all_reduce":
        b.comm("ffn_allreduce", Collective.ALL_REDUCE, "tp", out, "hidden_out", size=tp,
               cost=comm(h * ACT_BYTES), role=Role.TP_COMM)
    elif mode == "all_gather":
        b.comm("ffn_scatter", Collective.REDUCE_SCATTER, "tp", out, "hidden_out", size=tp,
               cost=comm(tp * h * ACT_BYTES), role=Role.TP_COMM)


def attention_tp(par: ParallelConfig) -> int:
    """Attention's tensor-parallel degree (1 when the tp group serves an all-gather MoE)."""
    return 1 if par.moe_comm == "all_gather" else par.tp


def attention_output(b: GraphBuilder, par: ParallelConfig, hidden: int, o_cost: OpCost,
                     role: str, src: str = "attn_o") -> None:
    """o_proj (``src -> h``), all-reduced over the tp group when attention is split."""
    tp = attention_tp(par)
    if tp == 1:
        b.compute("o_proj", src, "h", cost=o_cost, role=role)
        return
    b.compute("o_proj", src, "h_partial", cost=o_cost, role=role)
    b.comm("attn_allreduce", Collective.ALL_REDUCE, "tp", "h_partial", "h", size=tp,
           cost=comm(hidden * ACT_BYTES), role=Role.TP_COMM)


def split_heads(heads: int, tp: int, what: str = "num_heads") -> int:
    if heads % tp:
        raise ConfigError(f"{what} ({heads}) must be divisible by the attention tp ({tp})")
    return heads // tp
