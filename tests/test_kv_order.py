"""``unordered_kv_reads``: a microbatch continuing a cut request attends to the KV cache the
previous microbatch wrote in the same layer, so the plan must run that write first on every
backend (stream order or a wait). Torch-free: the vLLM adapter's own layer graphs."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from overlap.integrations.vllm.graph import layer_graph
from overlap.ops_graph.graph import ModelGraph
from overlap.plan import STRATEGIES, Batch, Stream, build_plan, split, unordered_kv_reads
from tests.strategies import batches

MODEL = ModelGraph("deepseek", [layer_graph(moe="dense", tp=2),
                                *[layer_graph(moe="split", tp=2, shared=True)] * 2])
LONG = Batch.of([(600, 0), (40, 0), (24, 0)])  # 2 microbatches cut the 600-token prompt
PLANNED = sorted(name for name, s in STRATEGIES.items() if s.build is not None)


def _counts(name: str) -> list[int]:
    return [n for n in STRATEGIES[name].microbatch_counts if n > 1] or [2]


@settings(max_examples=30, deadline=None)
@given(batches(), st.sampled_from(PLANNED), st.integers(2, 4))
def test_a_plan_built_for_a_cut_split_orders_every_continuing_attention(batch: Batch, name: str,
                                                                         n: int) -> None:
    """Every built-in strategy, planned for the split it runs, orders each continuing
    microbatch's attention after the previous microbatch's in every layer."""
    assume(n in _counts(name) or not STRATEGIES[name].microbatched)
    planned = split(batch, n, split_requests=True, min_tokens=1)
    assume(planned.n == n)
    assert unordered_kv_reads(build_plan(name, MODEL, planned)) == []


def _own_streams(plan, micro: int):
    """``plan`` with microbatch ``micro``'s compute steps moved to a stream of their own."""
    extra = len(plan.streams)
    compute = {i for i, s in enumerate(plan.streams) if s.kind == "compute"}
    steps = [s._replace(stream=extra) if s.micro == micro and s.stream in compute else s
             for s in plan.steps]
    return attrs.evolve(plan, streams=(*plan.streams, Stream("compute_mb1", "compute")),
                        steps=steps)


def test_a_reused_plan_with_a_stream_per_microbatch_is_caught() -> None:
    """A plan built for a request-boundary split, with microbatch 1's compute on its own
    stream: nothing orders its attention after microbatch 0's, so used for a split that cuts
    a request layer 0 is reported (later layers are ordered through the shared comm stream: its
    all-reduces run in issue order); built for that cut split it waits and passes."""
    boundary = split(LONG, 2, min_tokens=1)
    cut = split(LONG, 2, split_requests=True, min_tokens=1)
    assert not boundary.micro[1].continues_request and cut.micro[1].continues_request
    reused = _own_streams(build_plan("deepseek_prefill", MODEL, boundary), 1)
    assert unordered_kv_reads(reused) == []  # for its own split: nothing to order
    gaps = unordered_kv_reads(reused, continues=[False, True])
    assert gaps == [

        "attn (layer 0, microbatch 1, stream compute_mb1) may run before attn (layer 0, "
        "microbatch 0, stream compute) writes the KV cache it reads: neither stream order nor a "
        "wait puts it after"]
    assert unordered_kv_reads(_own_streams(build_plan("deepseek_prefill", MODEL, cut), 1)) == []


@pytest.mark.parametrize("layer", [0, 2])
def test_a_continuing_attention_issued_first_on_the_same_stream_is_caught(layer: int) -> None:
    """Same stream, but microbatch 1's attention issued before microbatch 0's in one layer."""
    plan = build_plan("deepseek_prefill", MODEL, split(LONG, 2, min_tokens=1))
    steps = list(plan.steps)
    index = plan.index()
    a, b = index[(layer, 0, "attn")], index[(layer, 1, "attn")]
    steps[a], steps[b] = steps[b], steps[a]
    gaps = unordered_kv_reads(attrs.evolve(plan, steps=steps), continues=[False, True])
    assert [g.split(",")[0] for g in gaps] == [f"attn (layer {layer}"]


def test_without_a_cut_request_there_is_nothing_to_order() -> None:
    """Microbatch 0 continues nothing; neither does a split at request boundaries."""
    plan = _own_streams(build_plan("deepseek_prefill", MODEL, split(LONG, 2, min_tokens=1)), 1)
    assert unordered_kv_reads(plan, continues=[True, False]) == []
    assert unordered_kv_reads(plan) == []
