"""``sequential``: the plain forward, the baseline every strategy is measured against.

One microbatch, one stream, every op after the previous one: no overlap at all.

    main: attn gate dispatch experts shared combine merge | attn ...
"""

from __future__ import annotations

from overlap.ops_graph.graph import ModelGraph
from overlap.plan.plan import Plan, Stream
from overlap.plan.split import Split, whole
from overlap.plan.strategies.engine import build, in_order

MAIN = (Stream("main", "mixed"),)


def sequential(model: ModelGraph, split: Split) -> Plan:
    """Every op of the unsplit batch in order on a single stream."""
    return build("sequential", model, whole(split.batch), in_order(1), streams=MAIN,
                 stream_of=lambda op: 0)
