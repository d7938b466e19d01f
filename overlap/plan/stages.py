"""The anatomy of a MoE layer as strategies see it: ops grouped into named stages by role.

Strategies are written once over these stages, not per model. A stage a layer lacks is simply
empty (a dense layer has no dispatch; attention as one op leaves ``attn0`` empty), and an op
whose role is unknown joins the stage of the op it depends on, so any graph can be scheduled.
That is how FP8 casts (role ``quant``) are placed: a cast runs with the op that produced its
input (``ffn_quant`` after the router, in ``gate``, so the dispatch sends FP8), while MoE
permute / unpermute (role ``permute``) belong to ``experts``, on the dispatched rows.

Stages are *monotone* in the order a strategy issues them: an op is never put in a stage issued
before the stage of an op it depends on, whatever its role says. A strategy that issues each
microbatch's stages of a layer in one order therefore issues every op after its producers, even
for an oddly wired graph (DeepSeek's decode runs the shared experts before the routed ones, vLLM
after them, so the order is the strategy's, ``STAGES`` by default).
"""

from __future__ import annotations

from collections.abc import Sequence

from overlap.errors import ConfigError
from overlap.ops_graph.graph import Graph
from overlap.ops_graph.op import OpKind, Role

STAGES = ("attn0", "attn1", "tp_attn", "gate", "dispatch", "experts", "shared", "combine",
          "merge", "tp_ffn")

_BY_ROLE = {
    Role.ATTN0: "attn0", Role.MLA_MATRIX: "attn0", Role.MLA_VECTOR: "attn0",
    Role.ATTN: "attn1", Role.ATTN1: "attn1",
    Role.GATE: "gate",
    Role.DISPATCH: "dispatch",
    Role.EXPERTS: "experts", Role.MLP: "experts", Role.PERMUTE: "experts",
    Role.SHARED: "shared",
    Role.COMBINE: "combine",
    Role.MERGE: "merge",
}
_ATTENTION = ("attn0", "attn1")


def _role_stage(role: str, kind: OpKind, deps: list[str]) -> str | None:
    """The stage an op's role and kind ask for, before the monotone correction."""
    stage = _BY_ROLE.get(role)
    if stage is not None:
        return stage
    if role == Role.NORM and any(d in _ATTENTION or d == "tp_attn" for d in deps):
        return "gate"  # the post-attention norm of a dense layer plays the router's part
    if kind is OpKind.COMM:
        # A tensor-parallel collective: right after attention it reduces attention's output; a
        # gather that feeds the experts plays dispatch; anything later closes the FFN.
        if deps and all(d in _ATTENTION for d in deps):
            return "tp_attn"
        if "gate" in deps:
            return "dispatch"
        return "tp_ffn"
    return None


def stages(graph: Graph, order: Sequence[str] = STAGES) -> dict[str, tuple[str, ...]]:
    """Each stage's ops in topological order (every stage present, possibly empty).

    order: the order the strategy issues one microbatch's stages in (a permutation of
           ``STAGES``); no op lands in a stage ordered before the stage of its dependencies.
    """
    if sorted(order) != sorted(STAGES):
        raise ConfigError(f"'order' must be a permutation of {', '.join(STAGES)} (got {list(order)})")
    rank = {s: i for i, s in enumerate(order)}
    stage_of: dict[str, str] = {}
    for op in graph:  # topological order: dependencies are classified first
        deps = [stage_of[d] for d in graph.deps[op.name]]
        floor = max(deps, key=rank.__getitem__) if deps else order[0]
        stage = _role_stage(op.role, op.kind, deps) or floor
        stage_of[op.name] = stage if rank[stage] >= rank[floor] else floor
    out: dict[str, list[str]] = {s: [] for s in STAGES}
    for name in graph.order:
        out[stage_of[name]].append(name)
    return {s: tuple(v) for s, v in out.items()}
