"""DeepSeek's published prefill and decode overlap schedules (two microbatches).

Source: the figures of github.com/deepseek-ai/profile-data (README, "Inference"). Here
microbatch 0 leads (it starts layer 0), so the labels are those of the figures with 0 and 1
swapped; the figures' period starts in the middle of a layer.

Prefill — the combine of one microbatch hides under the other's attention, and the shared
experts run while their own combine is in flight:

    compute: ATTN(0) SHARED(1,L-1) ATTN(1) MLP(0) MLP(1) SHARED(0)
    comm:    COMBINE(1,L-1) DISPATCH(0) DISPATCH(1) COMBINE(0)

Decode — attention in two stages (ATTN-0: projections, and the merge of the previous layer;
ATTN-1: core attention, o_proj, gate) makes a five-stage pipeline; the shared experts run while
their own dispatch is in flight (DeepEP's low-latency all-to-all occupies no SMs):

    compute: ATTN0(0) MLP(1,L-1) ATTN1(0) SHARED(0) ATTN0(1) MLP(0) ATTN1(1) SHARED(1)
    comm:         COMBINE(1,L-1)   DISPATCH(0)          COMBINE(0)    DISPATCH(1)

Both need exactly two microbatches; when the split was refused (one microbatch) the plan runs
the batch whole and records why in ``options["fallback"]``.
"""

from __future__ import annotations

from overlap.errors import ConfigError
from overlap.ops_graph.graph import ModelGraph
from overlap.plan.plan import Plan
from overlap.plan.split import Split
from overlap.plan.strategies.engine import build, in_order

HEAD = ("attn0", "attn1", "tp_attn", "gate")
TAIL = ("merge", "tp_ffn")


def _all(delta: int, micro: int, names: tuple[str, ...]) -> list[tuple[int, int, str]]:
    return [(delta, micro, s) for s in names]


PREFILL = [
    *_all(0, 0, HEAD), (0, 0, "dispatch"),                      # ATTN(0), DISPATCH(0)
    *_all(1, 1, ("shared", *TAIL)),                             # SHARED(1, L-1)
    *_all(0, 1, HEAD), (0, 1, "dispatch"),                      # ATTN(1), DISPATCH(1)
    (0, 0, "experts"), (0, 0, "combine"),                       # MLP(0), COMBINE(0)
    (0, 1, "experts"), (0, 1, "combine"),                       # MLP(1), COMBINE(1)
    *_all(0, 0, ("shared", *TAIL)),                             # SHARED(0)
]

DECODE = [
    (0, 0, "attn0"),                                            # ATTN-0(0)
    (1, 1, "experts"), (1, 1, "combine"),                       # MLP(1, L-1), COMBINE(1, L-1)
    *_all(0, 0, ("attn1", "tp_attn", "gate")),                  # ATTN-1(0)
    (0, 0, "dispatch"), (0, 0, "shared"),                       # DISPATCH(0), SHARED(0)
    *_all(1, 1, TAIL), (0, 1, "attn0"),                         # ATTN-0(1)
    (0, 0, "experts"), (0, 0, "combine"),                       # MLP(0), COMBINE(0)
    *_all(0, 1, ("attn1", "tp_attn", "gate")),                  # ATTN-1(1)
    (0, 1, "dispatch"), (0, 1, "shared"),                       # DISPATCH(1), SHARED(1)
    *_all(0, 0, TAIL),                                          # (merge of 0: next ATTN-0)
]


def _two(name: str, model: ModelGraph, split: Split, pattern: list) -> Plan:
    if split.n == 1:  # the split was refused: nothing to pipeline, run it whole
        return build(name, model, split, in_order(1),
                     options={"fallback": split.reason or "one microbatch"})
    if split.n != 2:
        raise ConfigError(f"strategy {name!r} needs 2 microbatches (got {split.n}); "
                          "split the batch with n=2")
    return build(name, model, split, pattern)


def deepseek_prefill(model: ModelGraph, split: Split) -> Plan:
    """DeepSeek's prefill overlap: combine under the other microbatch's attention."""
    return _two("deepseek_prefill", model, split, PREFILL)


def deepseek_decode(model: ModelGraph, split: Split) -> Plan:
    """DeepSeek's five-stage decode pipeline (build the graph with ``attention="two_stage"``)."""
    return _two("deepseek_decode", model, split, DECODE)
