"""One-microbatch overlap: the batch is not split, the MoE block is cut into chunks of experts.

Two-microbatch overlap loses on small batches: the split halves each GEMM (launch and latency
dominate) and, when decode is memory bound, each microbatch reads every routed expert's weights
again. These strategies keep the batch whole and overlap the MoE block's own communication:

- ``single_batch`` — SGLang's single-batch overlap (``--enable-single-batch-overlap``, the
  ``SboFlags`` of ``srt/batch_overlap/single_batch_overlap.py``): the shared experts run while the
  dispatch is in flight, and the routed experts' output is combined in chunks as they finish
  (DeepEP's combine starts sending a block once the down GEMM signals it):

      compute: attn gate shared experts#0 experts#1 ... experts#r-1 merge
      comm:               dispatch          combine#0 ... combine#r-2 combine#r-1

- ``chunked_experts`` — per-expert rounds (Tutel's pipelined all-to-all, "Tutel: adaptive
  mixture-of-experts at scale", MLSys 2023; SGLang's per-expert overlap): dispatch, experts and
  combine all run in ``r`` rounds of ``1/r`` of the local experts, so round k's experts compute
  while round k+1 is dispatched and round k-1 combined:

      compute: attn gate shared experts#0 experts#1 ... merge
      comm:         dispatch#0 dispatch#1 ... combine#0 combine#1 ...

A chunk holds ``1/r`` of the local experts, so it does ``1/r`` of the flops and reads ``1/r`` of
the weights: chunking adds no weight reads (unlike a second microbatch), only a launch and a
collective latency per chunk, which is what makes too many chunks lose. The chunks' outputs are
slices of one buffer, so joining them costs nothing.

Chunking rewrites the layer graph (ops ``experts_c0``... with chunk-level dependencies; the
permute and unpermute around the experts are cut with them), which
only a simulation can run: a graph whose expert ops carry callables cannot be cut by experts
generically, so then the order runs unchunked and ``options["fallback"]`` says why. A layer
without the EP chain dispatch -> experts -> combine (a dense or tensor-parallel layer) is left as
it is.
"""

from __future__ import annotations

import attrs

from overlap.ops_graph.cost import FREE, Formula, OpCost
from overlap.ops_graph.graph import Graph, ModelGraph
from overlap.ops_graph.op import Op, OpKind, Role
from overlap.plan.plan import DEFAULT_STREAMS, Plan
from overlap.plan.split import Split, unsplit
from overlap.plan.strategies.engine import build

CHUNKS = 4  # the named strategies' chunk count; auto searches others
SHARED_UNDER_DISPATCH = ("attn0", "attn1", "tp_attn", "gate", "dispatch", "shared", "experts",
                         "combine", "merge", "tp_ffn")


def scaled(cost: OpCost, factor: float) -> OpCost:
    """``cost`` with every formula multiplied by ``factor`` (saturating weight bytes included)."""
    def times(f: Formula) -> Formula:
        return attrs.evolve(f, const=f.const * factor, per_token=f.per_token * factor,
                            per_request=f.per_request * factor, per_context=f.per_context * factor,
                            per_pair=f.per_pair * factor, saturating=f.saturating * factor)

    return attrs.evolve(cost, flops=times(cost.flops), vector_flops=times(cost.vector_flops),
                        hbm_bytes=times(cost.hbm_bytes), comm_bytes=times(cost.comm_bytes),
                        matrix_outputs=times(cost.matrix_outputs))


def moe_chain(graph: Graph) -> tuple[Op, tuple[Op, ...], Op] | None:
    """The layer's (dispatch, expert ops, combine) when they form a simple chain, else None.

    The expert ops are the routed experts and the single-input compute ops that run on the
    dispatched rows around them (the template's permute / unpermute): each one reads only the
    previous one's single output, from the dispatch's to the combine's input.
    """
    def one(role: str) -> Op | None:
        ops = graph.of_role(role)
        return ops[0] if len(ops) == 1 else None

    dispatch, experts, combine = one(Role.DISPATCH), one(Role.EXPERTS), one(Role.COMBINE)
    if None in (dispatch, experts, combine) or dispatch.kind is not OpKind.COMM:
        return None
    if len(dispatch.writes) != 1 or len(combine.writes) != 1:
        return None
    readers: dict[str, list[Op]] = {}
    for op in graph.ops:
        for value in op.reads:
            readers.setdefault(value, []).append(op)
    segment: list[Op] = []
    value = dispatch.writes[0]
    while True:
        after = readers.get(value, [])
        if len(after) != 1:
            return None
        nxt = after[0]
        if nxt is combine:
            break
        if nxt.kind is not OpKind.COMPUTE or len(nxt.reads) != 1 or len(nxt.writes) != 1:
            return None
        segment.append(nxt)
        value = nxt.writes[0]
    if combine.reads != (value,) or experts not in segment:
        return None
    return dispatch, tuple(segment), combine


def chunk_moe(graph: Graph, chunks: int, *, dispatch: bool) -> Graph:
    """``graph`` with its expert ops and combine (and, with ``dispatch``, the dispatch) cut into
    ``chunks`` chunks of experts; unchanged when it has no EP chain or ``chunks`` is 1."""
    chain = moe_chain(graph)
    if chain is None or chunks == 1:
        return graph
    d, segment, c = chain
    part = 1.0 / chunks
    ops: list[Op] = []
    for k in range(chunks):
        value = f"{d.writes[0]}_c{k}" if dispatch else d.writes[0]
        if dispatch:
            ops.append(Op(f"{d.name}_c{k}", d.kind, d.reads, value, comm=d.comm,
                          cost=scaled(d.cost, part), role=d.role))
        for e in segment:
            out = f"{e.writes[0]}_c{k}"
            ops.append(Op(f"{e.name}_c{k}", e.kind, value, out, cost=scaled(e.cost, part),
                          role=e.role))
            value = out
    last = segment[-1].writes[0]
    for k in range(chunks):
        ops.append(Op(f"{c.name}_c{k}", c.kind, f"{last}_c{k}", f"{c.writes[0]}_c{k}",
                      comm=c.comm, cost=scaled(c.cost, part), role=c.role))
    join = Op(f"{c.name}_join", OpKind.COMPUTE, [f"{c.writes[0]}_c{k}" for k in range(chunks)],
              c.writes[0], cost=FREE, role=Role.MERGE)
    replaced = {c.name, *(e.name for e in segment)} | ({d.name} if dispatch else set())
    first = min(i for i, op in enumerate(graph.ops) if op.name in replaced)
    kept = [op for op in graph.ops if op.name not in replaced]
    return attrs.evolve(graph, ops=[*kept[:first], *ops, join, *kept[first:]])


def uncuttable(model: ModelGraph) -> str:
    """Why ``model``'s MoE chains cannot be cut into chunks of experts ("" when they can)."""
    callable_ops = {op.name for g in model.distinct() if (ch := moe_chain(g))
                    for op in (ch[0], *ch[1], ch[2]) if op.fn is not None}
    if callable_ops:
        return (f"ops {', '.join(sorted(callable_ops))} carry callables, which cannot be cut "
                "into chunks of experts: run unchunked")
    return ""


def chunked(model: ModelGraph, chunks: int, *, dispatch: bool) -> tuple[ModelGraph, str]:
    """``model`` with every EP layer chunked, and why not ("" when it was)."""
    if chunks < 1:
        from overlap.errors import ConfigError

        raise ConfigError(f"'chunks' must be >= 1 (got {chunks})")
    why = uncuttable(model)
    if why:
        return model, why
    if not any(moe_chain(g) for g in model.distinct()):
        return model, "no dispatch -> experts -> combine chain to chunk"
    done = {id(g): chunk_moe(g, chunks, dispatch=dispatch) for g in model.distinct()}
    return ModelGraph(model.name, [done[id(g)] for g in model.layers]), ""


def one_batch_plan(name: str, model: ModelGraph, split: Split, chunks: int, *,
                   dispatch: bool) -> Plan:
    """The whole batch, shared experts under the dispatch, the MoE chain in ``chunks`` chunks."""
    graph, why = chunked(model, chunks, dispatch=dispatch)
    options = {"chunks": 1, "fallback": why} if why and chunks > 1 else {"chunks": chunks}
    pattern = [(0, 0, s) for s in SHARED_UNDER_DISPATCH]
    return build(name, graph, unsplit(split), pattern, streams=DEFAULT_STREAMS,
                 options=options)


def single_batch(model: ModelGraph, split: Split) -> Plan:
    """SGLang's single-batch overlap: shared experts under the dispatch, combine in chunks."""
    return one_batch_plan("single_batch", model, split, CHUNKS, dispatch=False)


def chunked_experts(model: ModelGraph, split: Split) -> Plan:
    """Per-expert rounds: dispatch, experts and combine in chunks of the local experts."""
    return one_batch_plan("chunked_experts", model, split, CHUNKS, dispatch=True)
