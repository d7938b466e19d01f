"""Executing any plan of the reference model gives the unsplit forward's tensors, bit for bit.

The model runs with exact (row-independent) kernels, so every strategy, microbatch count and
backend must reproduce ``plain_forward`` exactly; with torch's own kernels (``exact=False``)
the row-count-dependent matmul blocking leaves differences of a few 1e-6, checked against a
1e-5 tolerance. The batch mixes a fresh prompt, decodes and a chunked prefill, and the
``split_requests`` cases cut a request in two so that its second half attends to the first
half's KV-cache rows, written by the previous microbatch in the same layer.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from overlap.errors import ConfigError  # noqa: E402
from overlap.plan import NAMED, STRATEGIES, Batch, build_plan, split  # noqa: E402
from overlap.reference import TINY, ReferenceModel  # noqa: E402

MIXED = Batch.of([(5, 0), (1, 6), (4, 3), (1, 2)])  # prefill, decode, chunked prefill, decode
CONTEXTS = {1: 6, 2: 3, 3: 2}
GRAIN = {name: s.grain for name, s in STRATEGIES.items()}
# Each strategy at every count it accepts, and at 1 (a refused split runs whole).
CASES = [(name, n) for name in NAMED for n in sorted({1, *STRATEGIES[name].microbatch_counts})]


@pytest.fixture(scope="module")
def model() -> ReferenceModel:
    return ReferenceModel(TINY, num_layers=3)  # one dense layer, two MoE layers


@pytest.fixture(scope="module")
def graphs(model):
    return {grain: model.model_graph(grain) for grain in ("one", "two_stage", "fine")}


def reference(model, batch, contexts, seed=0):
    inputs = model.inputs(batch.tokens, seed=seed)
    step = model.step(batch, model.cache(contexts))
    return inputs, model.plain_forward(inputs["hidden"], inputs["residual"], step)


@pytest.fixture(scope="module")
def mixed(model):
    return reference(model, MIXED, CONTEXTS)


def execute(model, plan, inputs, contexts, backend):
    return model.run(plan, inputs, model.step(plan.split, model.cache(contexts)), backend=backend)


def assert_same(out, ref, plan):
    for name in ("hidden_out", "residual_out"):
        diff = (out[name] - ref[name]).abs().max().item()
        assert torch.equal(out[name], ref[name]), f"{name} differs by {diff:.3g} under\n{plan}"


def plan_for(graph, name, n, split_requests, **kw):
    return build_plan(name, graph, split(MIXED, n, split_requests=split_requests), **kw)


@pytest.mark.parametrize("backend", ["inline", "threads"])
@pytest.mark.parametrize("split_requests", [False, True], ids=["whole-requests", "cut-requests"])
@pytest.mark.parametrize(("name", "n"), CASES)
def test_every_strategy_reproduces_the_plain_forward(model, graphs, mixed, name, n,
                                                     split_requests, backend):
    """A strategy's plan, executed, gives the plain forward's output bit for bit."""
    inputs, ref = mixed
    plan = plan_for(graphs[GRAIN.get(name, "one")], name, n, split_requests)
    assert_same(execute(model, plan, inputs, CONTEXTS, backend), ref, plan)


@pytest.mark.parametrize("grain", ["one", "two_stage", "fine"])
def test_every_attention_grain_reproduces_the_plain_forward(model, graphs, mixed, grain):
    """The same strategy on each attention grain gives the plain forward's output."""
    inputs, ref = mixed
    plan = plan_for(graphs[grain], "ascend_dbo", 2, True)
    assert_same(execute(model, plan, inputs, CONTEXTS, "threads"), ref, plan)


@pytest.mark.parametrize("name", ["deepseek_prefill", "sglang_tbo"])
def test_mla_vector_work_on_a_second_stream_reproduces_the_plain_forward(model, graphs, mixed, name):
    """Moving MLA's vector ops to a second compute stream changes no bit of the output."""
    inputs, ref = mixed
    plan = plan_for(graphs["fine"], name, 2, False, multistream_mla=True)
    assert len(plan.streams) == 3
    assert_same(execute(model, plan, inputs, CONTEXTS, "threads"), ref, plan)


def test_a_request_cut_in_two_attends_to_its_first_half(model, graphs):
    """With one prompt cut across two microbatches the second half reads the first half's KV."""
    batch = Batch.of([(9, 0)])
    inputs, ref = reference(model, batch, {})
    s = split(batch, 2, split_requests=True)
    assert s.n == 2 and s.micro[1].continues_request
    plan = build_plan("deepseek_prefill", graphs["one"], s)
    assert_same(execute(model, plan, inputs, {}, "threads"), ref, plan)


def test_fast_kernels_agree_within_float_tolerance(mixed):
    """With torch's own kernels a split run matches the plain forward to 1e-5 (not bitwise)."""
    fast = ReferenceModel(TINY, num_layers=3, exact=False)
    inputs, ref = reference(fast, MIXED, CONTEXTS)
    plan = build_plan("sglang_tbo", fast.model_graph(), split(MIXED, 2, split_requests=True))
    out = execute(fast, plan, inputs, CONTEXTS, "threads")
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-5, atol=1e-5)


def test_torch_streams_reproduce_the_plain_forward(model, graphs, mixed):
    """On an accelerator, the torch_streams backend gives the plain forward's output."""
    if not (hasattr(torch, "accelerator") and torch.accelerator.is_available()):
        pytest.skip("torch_streams needs an accelerator; torch reports none on this machine")
    inputs, ref = mixed
    plan = plan_for(graphs["one"], "deepseek_prefill", 2, True)
    assert_same(execute(model, plan, inputs, CONTEXTS, "torch_streams"), ref, plan)


def test_the_auto_strategy_reproduces_the_plain_forward(model, graphs, mixed):
    """Whatever plan the search picks, it computes the plain forward's output."""
    from overlap.search import search

    inputs, ref = mixed
    plan = search(graphs["one"], MIXED, "910b2", progress=False).plan
    assert_same(execute(model, plan, inputs, CONTEXTS, "threads"), ref, plan)


requests = st.lists(st.tuples(st.integers(1, 6), st.integers(0, 5)), min_size=1, max_size=4)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=requests, name=st.sampled_from(NAMED), n=st.integers(1, 3),
       split_requests=st.booleans())
def test_random_batches_reproduce_the_plain_forward(model, graphs, lengths, name, n, split_requests):
    """For random prefill/decode mixes, any strategy's threaded run equals the plain forward."""
    batch = Batch.of(lengths)
    contexts = {i: c for i, (_, c) in enumerate(lengths) if c}
    inputs, ref = reference(model, batch, contexts, seed=len(lengths))
    try:
        plan = build_plan(name, graphs[GRAIN.get(name, "one")],
                          split(batch, n, split_requests=split_requests))
    except ConfigError:
        return  # the strategy does not take n microbatches; covered by the sweep above
    assert_same(execute(model, plan, inputs, contexts, "threads"), ref, plan)
