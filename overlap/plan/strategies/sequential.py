"""``sequential``: the plain forward, the baseline every strategy is measured against; ``off``.

One microbatch, one stream, every op after the previous one: no overlap at all. ``off`` is the
same order as an explicit choice (``options["off"]``): a runtime runs the model's own forward.

    main: attn gate dispatch experts shared combine merge | attn ...
"""

from __future__ import annotations

from overlap.ops_graph.graph import ModelGraph
from overlap.plan.plan import Plan, Stream
from overlap.plan.split import Split, unsplit
from overlap.plan.strategies.engine import build, in_order

MAIN = (Stream("main", "mixed"),)


def sequential(model: ModelGraph, split: Split) -> Plan:
    """Every op of the unsplit batch in order on a single stream."""
    return build("sequential", model, unsplit(split), in_order(1), streams=MAIN,
                 stream_of=lambda op: 0)


def off(model: ModelGraph, split: Split) -> Plan:
    """Overlap off: the plain forward's order, marked so that a runtime skips the executor and
    runs the model's own forward (what ``auto`` picks when every overlap would lose)."""
    return build("off", model, unsplit(split), in_order(1), streams=MAIN,
                 stream_of=lambda op: 0, options={"off": True})
