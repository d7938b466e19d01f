"""The anatomy of a MoE layer as strategies see it: ops grouped into named stages by role.

Strategies are written once over these stages, not per model. A stage a layer lacks is simply
empty (a dense layer has no dispatch; attention as one op leaves ``attn0`` empty), and an op
whose role is unknown joins the stage of the op it depends on, so any graph can be scheduled.
"""

from __future__ import annotations

from overlap.ops_graph.graph import Graph
from overlap.ops_graph.op import OpKind, Role

STAGES = ("attn0", "attn1", "tp_attn", "gate", "dispatch", "experts", "shared", "combine",
          "merge", "tp_ffn")

_BY_ROLE = {
    Role.ATTN0: "attn0", Role.MLA_MATRIX: "attn0", Role.MLA_VECTOR: "attn0",
    Role.ATTN: "attn1", Role.ATTN1: "attn1",
    Role.GATE: "gate",
    Role.DISPATCH: "dispatch",
    Role.EXPERTS: "experts", Role.MLP: "experts",
    Role.SHARED: "shared",
    Role.COMBINE: "combine",
    Role.MERGE: "merge",
}
_ATTENTION = ("attn0", "attn1")


def stages(graph: Graph) -> dict[str, tuple[str, ...]]:
    """Each stage's ops in topological order (every stage present, possibly empty)."""
    stage_of: dict[str, str] = {}
    for op in graph:  # topological order: dependencies are classified first
        stage = _BY_ROLE.get(op.role)
        deps = [stage_of[d] for d in graph.deps[op.name]]
        if op.kind is OpKind.COMM and stage is None:
            # A tensor-parallel collective: after attention it reduces attention's output; a
            # gather that feeds the experts plays dispatch; anything later closes the FFN.
            if any(d in _ATTENTION for d in deps):
                stage = "tp_attn"
            elif "gate" in deps:
                stage = "dispatch"
            else:
                stage = "tp_ffn"
        if stage is None:
            stage = max(deps, key=STAGES.index) if deps else "attn0"
        stage_of[op.name] = stage
    out: dict[str, list[str]] = {s: [] for s in STAGES}
    for name in graph.order:
        out[stage_of[name]].append(name)
    return {s: tuple(v) for s, v in out.items()}
