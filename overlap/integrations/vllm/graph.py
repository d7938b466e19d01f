"""The ops graph of a vLLM DeepSeek decoder layer, at the grain vLLM 0.32 lets us cut it.

    attn            input RMSNorm + MLA (q/kv projections, rope, KV-cache write, core
                    attention, o_proj)                                   role attn
    attn_allreduce  o_proj's tensor-parallel all-reduce (tp > 1 only)    comm, role tp_comm
    post_norm       post-attention RMSNorm (+ residual add)              role norm

MoE layers, split (``moe="split"``: the layer's fused-MoE kernel is a modular kernel):

    gate            post-attention RMSNorm + router gate + top-k         role gate
    dispatch        the kernel's ``prepare`` (local: quantize the input)  role dispatch
                    or, with expert parallelism (``ep > 1``), the adapter's all-to-all that
                    sends each token's rows to the ranks owning its experts (comm, group ep)
    experts         the kernel's ``fused_experts.apply`` on the local experts  role experts
    combine         the kernel's ``finalize`` (local top-k weight-and-reduce)  role combine
                    or, with ``ep > 1``, the all-to-all bringing the rows back (comm, group ep)
    shared          the shared experts                                   role shared
    merge           routed scale + shared + routed sum                   role merge

MoE layers, coarse (``moe="coarse"``: a monolithic kernel, or a configuration the split does not
serve): ``post_norm`` then one ``experts`` op, vLLM's whole ``MoERunner``. Dense layers: ``mlp``.
With ``tp > 1`` the feed-forward ends in ``ffn_allreduce`` (comm, role tp_comm), which with expert
parallelism also sums each token's routed rows back onto every rank.

Torch- and vLLM-free, so the graphs are unit-tested.
"""

from __future__ import annotations

from overlap.errors import ConfigError
from overlap.ops_graph.authoring import GraphBuilder
from overlap.ops_graph.graph import Graph
from overlap.ops_graph.op import Collective, Role

INPUTS = ("hidden", "residual")
OUTPUTS = ("hidden_out", "residual_out")
MOE_FORMS = ("dense", "coarse", "split")


def layer_graph(*, moe: bool | str, tp: int, ep: int = 1, shared: bool = True) -> Graph:
    """One decoder layer: ``hidden, residual -> hidden_out, residual_out``.

    moe:    ``"dense"`` (or False), ``"coarse"`` (or True) or ``"split"``, as above.
    tp:     tensor-parallel size; > 1 adds the two all-reduces as communication ops.
    ep:     expert-parallel size of a split MoE layer; > 1 makes dispatch/combine all-to-alls.
    shared: whether a split MoE layer has shared experts (without them there is no merge).
    """
    form = {False: "dense", True: "coarse"}.get(moe, moe) if isinstance(moe, bool) else moe
    if form not in MOE_FORMS:
        raise ConfigError(f"'moe' must be one of {', '.join(MOE_FORMS)} (got {moe!r})")
    if ep > 1 and form != "split":
        raise ConfigError(f"'ep' > 1 needs the split MoE form (got ep={ep}, moe={form!r})")
    suffix = {"dense": "dense", "coarse": "moe", "split": "moe_split"}[form]
    b = GraphBuilder(f"deepseek.{suffix}{'.tp' if tp > 1 else ''}{'.ep' if ep > 1 else ''}",
                     INPUTS)
    if tp > 1:
        b.compute("attn", INPUTS, ("h_partial", "res1"), role=Role.ATTN)
        b.comm("attn_allreduce", Collective.ALL_REDUCE, "tp", "h_partial", "h", size=tp,
               role=Role.TP_COMM)
    else:
        b.compute("attn", INPUTS, ("h", "res1"), role=Role.ATTN)
    ffn_out = "ffn_partial" if tp > 1 else "hidden_out"
    if form == "split":
        _split_moe(b, ffn_out, ep, shared)
    else:
        b.compute("post_norm", ("h", "res1"), ("ffn_in", "residual_out"), role=Role.NORM)
        if form == "coarse":
            b.compute("experts", "ffn_in", ffn_out, role=Role.EXPERTS)
        else:
            b.compute("mlp", "ffn_in", ffn_out, role=Role.MLP)
    if tp > 1:
        b.comm("ffn_allreduce", Collective.ALL_REDUCE, "tp", "ffn_partial", "hidden_out", size=tp,
               role=Role.TP_COMM)
    return b.build(OUTPUTS)


def _split_moe(b: GraphBuilder, out: str, ep: int, shared: bool) -> None:
    b.compute("gate", ("h", "res1"), ("ffn_in", "residual_out", "topk"), role=Role.GATE)
    if ep > 1:
        b.comm("dispatch", Collective.ALL_TO_ALL, "ep", ("ffn_in", "topk"), "recv", size=ep,
               role=Role.DISPATCH)
    else:
        b.compute("dispatch", ("ffn_in", "topk"), "recv", role=Role.DISPATCH)
    b.compute("experts", "recv", "expert_out", role=Role.EXPERTS)
    if ep > 1:
        b.comm("combine", Collective.ALL_TO_ALL, "ep", ("expert_out", "recv"), "routed",
               size=ep, role=Role.COMBINE)
    else:
        b.compute("combine", ("expert_out", "recv"), "routed", role=Role.COMBINE)
    # merge applies the routed scale (and, with ep > 1, puts this rank's rows in the batch).
    if shared:
        b.compute("shared", "ffn_in", "shared_out", role=Role.SHARED)
        b.compute("merge", ("routed", "shared_out"), out, role=Role.MERGE)
    else:
        b.compute("merge", "routed", out, role=Role.MERGE)
