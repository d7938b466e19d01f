"""The built-in strategies: valid on any graph and batch, and in the orders their sources use."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlap.errors import ConfigError
from overlap.ops_graph import ModelGraph
from overlap.ops_graph.templates import ParallelConfig, build_model
from overlap.plan import NAMED, STRATEGIES, Batch, Strategy, build_plan, split, validate
from overlap.plan.diagrams import lanes, render, render_all, strategy_table
from overlap.plan.strategies.engine import build
from overlap.plan.strategies.sequential import sequential
from tests.strategies import batches, models
from tests.test_plan import TWO

DOC = Path(__file__).resolve().parent.parent / "docs" / "plan.md"
STRATEGIES_DOC = DOC.with_name("strategies.md")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models(), batches(), st.integers(1, 4), st.booleans(), st.sampled_from(NAMED),
       st.booleans())
def test_every_strategy_plans_any_graph_and_batch(model, batch, n, cut, name, vector):
    """On random graphs and batches each strategy yields a valid plan or a clear ConfigError."""
    s = split(batch, n, split_requests=cut)
    try:
        plan = build_plan(name, model, s, multistream_mla=vector)
    except ConfigError as exc:
        assert name.startswith("deepseek") and s.n > 2
        assert str(exc) == (f"strategy {name!r} needs 2 microbatches (got {s.n}); split the "
                            "batch with n=2")
        return
    validate(plan)


@pytest.mark.parametrize("parallel", [ParallelConfig(ep=16), ParallelConfig(tp=4),
                                      ParallelConfig(tp=4, moe_comm="all_gather"),
                                      ParallelConfig(tp=2, ep=8)])
@pytest.mark.parametrize(("phase", "attention"), [("prefill", "one"), ("decode", "two_stage"),
                                                  ("decode", "fine")])
@pytest.mark.parametrize("name", NAMED)
def test_every_strategy_plans_the_deepseek_templates(parallel, phase, attention, name):
    """Each strategy gives a valid plan for DeepSeek-V3 layers in every parallel form."""
    model = build_model("deepseek-v3", parallel, phase=phase, attention=attention, num_layers=5)
    batch = Batch.decode(32, 2048) if phase == "decode" else Batch.prefill(4096, 3)
    validate(build_plan(name, model, split(batch, 2, split_requests=True)))


@pytest.mark.parametrize("name", ["deepseek_prefill", "deepseek_decode"])
def test_deepseek_needs_two_microbatches(name):
    """Three microbatches cannot follow a two-microbatch schedule."""
    with pytest.raises(ConfigError, match=re.escape(
            f"strategy {name!r} needs 2 microbatches (got 3); split the batch with n=2")):
        build_plan(name, TWO, split(Batch.prefill(30, 3), 3))


@pytest.mark.parametrize("name", ["deepseek_prefill", "deepseek_decode"])
def test_deepseek_falls_back_when_the_split_was_refused(name):
    """A refused split runs whole and the plan records why."""
    s = split(Batch.prefill(100), 2)
    plan = build_plan(name, TWO, s)
    assert plan.n_micro == 1
    assert plan.options["fallback"] == s.reason


def _steady(name: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in render(name).splitlines())


def test_sglang_prefill_is_deepseeks_published_prefill():
    """SGLang's TBO prefill strategy is named after, and equal to, DeepSeek's blog schedule."""
    assert render("sglang_tbo") == render("deepseek_prefill")


def test_sglang_decode_is_deepseeks_five_stage_decode():
    """SGLang's decode strategy (tbo_delta_stages=2) gives DeepSeek's decode order."""
    assert render("sglang_tbo/decode") == render("deepseek_decode")


def test_deepseek_prefill_compute_lane_matches_the_figure():
    """Compute: ATTN(0) SHARED(1) ATTN(1) MLP(0) MLP(1) SHARED(0), labels as in the docstring
    (MLP: the routed experts between their permute and unpermute)."""
    assert _steady("deepseek_prefill")["compute"].split() == [
        "attn(0)", "gate(0)", "shared(1)'", "merge(1)'", "attn(1)", "gate(1)", "permute(0)",
        "experts(0)", "unpermute(0)", "permute(1)", "experts(1)", "unpermute(1)", "shared(0)",
        "merge(0)"]


def test_deepseek_decode_runs_shared_experts_under_the_dispatch():
    """Decode: SHARED(0) right after DISPATCH(0) is launched, before ATTN-0(1)."""
    compute = _steady("deepseek_decode")["compute"].split()
    assert compute[compute.index("gate(0)") + 1:compute.index("attn0(1)")] == ["shared(0)",
                                                                               "merge(1)'"]


def test_vllm_runs_shared_experts_after_launching_the_combine():
    """vLLM's modular kernel issues the shared experts behind the combine of the same ubatch."""
    plan = build_plan("vllm_dbo", TWO, split(Batch.prefill(8, 2), 2))
    order = [(s.op, s.micro) for s in plan.slot_steps(1)]
    assert order.index(("combine", 0)) < order.index(("shared", 0)) < order.index(("experts", 1))


def test_ascend_dbo_picks_its_form_from_the_collectives():
    """An all-to-all model gets the EP form, a tensor-parallel one the TP form."""
    ep = build_model("deepseek-v3", ParallelConfig(ep=16), num_layers=4)
    tp = build_model("deepseek-v3", ParallelConfig(tp=4), num_layers=4)
    s = split(Batch.prefill(64, 2), 2)
    assert build_plan("ascend_dbo", ep, s).options["form"] == "ep"
    assert build_plan("ascend_dbo", tp, s).options["form"] == "tp"


def test_multistream_mla_composes_with_a_microbatch_strategy():
    """MLA's vector ops move to the vector stream; the rest keeps the strategy's order."""
    model = build_model("deepseek-v3", ParallelConfig(ep=16), phase="decode", attention="fine",
                        num_layers=4)
    plan = build_plan("deepseek_decode", model, split(Batch.decode(16, 100), 2),
                      multistream_mla=True)
    assert plan.strategy == "deepseek_decode+multistream_mla"
    assert lanes(plan, 3).splitlines()[2].split()[1:4] == ["q_norm(0)", "q_rope(0)", "kv_prep(0)"]


def test_pattern_missing_an_entry_is_rejected():
    """A pattern that forgets microbatch 1's stages cannot be expanded."""
    with pytest.raises(ConfigError, match=r"^strategy 'x': its pattern must name each "):
        build("x", TWO, split(Batch.prefill(8, 2), 2), [(0, 0, s) for s in ("attn0",)])


def test_pattern_with_microbatches_out_of_turn_is_rejected():
    """Microbatch 1 taking a stage before microbatch 0 would break the KV-cache order."""
    from overlap.plan.stages import STAGES

    pattern = [(0, 1, s) for s in STAGES] + [(0, 0, s) for s in STAGES]
    with pytest.raises(ConfigError, match="^strategy 'x': microbatch 1 issues stage 'attn0' "
                                          "before microbatch 0"):
        build("x", TWO, split(Batch.prefill(8, 2), 2), pattern)


def test_docs_show_the_diagrams_the_code_draws():
    """docs/plan.md embeds exactly what `python -m overlap.plan.diagrams` prints."""
    text = DOC.read_text()
    begin, end = "<!-- diagrams:begin -->\n", "<!-- diagrams:end -->"
    assert text[text.index(begin) + len(begin):text.index(end)] == render_all()


def test_docs_strategy_table_is_generated_from_the_records():
    """docs/strategies.md embeds exactly ``python -m overlap.plan.diagrams --table``."""
    text = STRATEGIES_DOC.read_text()
    start = text.index("<!-- strategy-table -->\n") + len("<!-- strategy-table -->\n")
    assert text[start:text.index("<!-- /strategy-table -->")] == strategy_table()


def test_every_record_but_auto_builds_its_own_microbatch_count():
    """A record's preferred count is what its plan uses on a batch that splits."""
    model = build_model("deepseek-v3", ParallelConfig(ep=16), num_layers=4)
    for name in NAMED:
        record = STRATEGIES[name]
        plan = build_plan(name, model, split(Batch.prefill(4096, 2), record.microbatches))
        assert plan.n_micro == record.microbatches, name
    assert STRATEGIES["auto"].build is None and "auto" not in NAMED


def test_record_with_no_microbatch_count_is_refused():
    """A strategy must accept at least one count, each >= 1."""
    with pytest.raises(ConfigError, match=r"'microbatch_counts' must be non-empty counts >= 1 "
                                          r"\(got \(0,\)\)"):
        Strategy("x", sequential, (0,), "one", "", "")


def test_unknown_strategy_suggests_the_close_name():
    """A typo names the close strategy and lists the valid ones."""
    with pytest.raises(ConfigError, match=r"^unknown strategy 'vlm_dbo' \(did you mean "
                                          r"'vllm_dbo'\?\); valid: sequential, "):
        build_plan("vlm_dbo", build_model("deepseek-v3", num_layers=4), split(Batch.prefill(8), 1))


def _decode_ep(tokens: int = 32):
    model = build_model("deepseek-v3", ParallelConfig(ep=32), phase="decode", num_layers=5)
    return model, split(Batch.decode(tokens, 4096), 2, split_requests=True)


@pytest.mark.parametrize(("name", "chunked_dispatch"), [("single_batch", False),
                                                       ("chunked_experts", True)])
def test_one_batch_strategies_chunk_the_moe_chain(name, chunked_dispatch):
    """The batch runs whole; experts and combine (and dispatch for rounds) become 4 chunks each."""
    model, s = _decode_ep()
    plan = build_plan(name, model, s)
    moe = plan.model.layers[-1]
    assert plan.n_micro == 1 and plan.options == {"chunks": 4}
    assert [op.name for op in moe.of_role("experts")] == [f"experts_c{k}" for k in range(4)]
    assert [op.name for op in moe.of_role("combine")] == [f"combine_c{k}" for k in range(4)]
    dispatch = [op.name for op in moe.of_role("dispatch")]
    assert dispatch == ([f"dispatch_c{k}" for k in range(4)] if chunked_dispatch else ["dispatch"])
    assert [op.name for op in moe.of_role("permute")] == [
        f"{name}_c{k}" for k in range(4) for name in ("permute", "unpermute")]
    assert moe.deps["combine_c1"] == ("unpermute_c1",)  # a chunk combines once its experts finish


def test_chunks_hold_a_share_of_the_work_and_no_extra_weight_reads():
    """Summed over chunks, flops, memory bytes (weights included) and payload equal the op's."""
    from overlap.ops_graph.shape import Shape

    model, s = _decode_ep()
    whole_layer = model.layers[-1]
    moe = build_plan("chunked_experts", model, s).model.layers[-1]
    shape = Shape.of_requests([(1, 4096)] * 32)
    for role in ("dispatch", "experts", "combine"):
        (op,) = whole_layer.of_role(role)
        fig = op.cost(shape)
        parts = [c.cost(shape) for c in moe.of_role(role)]
        for field in ("flops", "hbm_bytes", "comm_bytes"):
            assert sum(getattr(p, field) for p in parts) == pytest.approx(getattr(fig, field)), role
    whole = sum(op.cost(shape).hbm_bytes for op in whole_layer.of_role("permute"))
    assert sum(op.cost(shape).hbm_bytes for op in moe.of_role("permute")) == pytest.approx(whole)


def test_two_microbatches_read_the_expert_weights_twice_in_small_decode():
    """Memory-bound decode: a second microbatch re-reads the routed weights; one batch does not."""
    from overlap.ops_graph.shape import Shape

    model, s = _decode_ep(8)
    (experts,) = model.layers[-1].of_role("experts")
    one = experts.cost(Shape.of_requests([(1, 4096)] * 8)).hbm_bytes
    two = sum(experts.cost(m.shape).hbm_bytes for m in s.micro)
    assert two > 1.5 * one


def test_chunked_combine_overlaps_the_next_chunks_experts():
    """In the simulated timeline combine_c0 runs while experts_c1 computes."""
    from overlap.backends.simulated import simulate

    model, s = _decode_ep(128)
    plan = build_plan("single_batch", model, s)
    spans = {(st.layer, st.op): span for st, span in zip(plan.steps, simulate(plan, "h800").spans)}
    layer = plan.n_layers - 1
    combine, experts = spans[layer, "combine_c0"], spans[layer, "experts_c1"]
    assert combine.start < experts.end and experts.start < combine.end


def test_one_batch_strategies_beat_two_microbatches_in_small_decode():
    """At 32 tokens per device two-microbatch plans lose to sequential; chunked ones win."""
    from overlap.backends.simulated import simulate

    model, s = _decode_ep(32)

    def step(name: str) -> float:
        return simulate(build_plan(name, model, s), "h800", comm_mode="low_latency").makespan

    seq = step("sequential")
    assert step("deepseek_prefill") > seq and step("vllm_dbo") > seq
    assert step("single_batch") < seq and step("chunked_experts") < seq


def test_graph_with_callables_runs_unchunked_and_says_why():
    """Expert ops with callables cannot be cut by experts: same order, one chunk, the reason."""
    model, s = _decode_ep()
    bound = ModelGraph(model.name, [g.bind({op.name: (lambda *a: a) for op in g})
                                    for g in model.layers])
    plan = build_plan("chunked_experts", bound, s)
    assert plan.options["chunks"] == 1
    assert plan.options["fallback"].startswith("ops combine, dispatch, experts, permute, unpermute "
                                               "carry callables")
    assert "experts" in plan.model.layers[-1]


def test_tensor_parallel_layers_are_left_unchunked():
    """Without an all-to-all chain there is nothing to chunk; the plan says so."""
    model = build_model("deepseek-v3", ParallelConfig(tp=4), num_layers=5)
    plan = build_plan("single_batch", model, split(Batch.prefill(512, 2), 2))
    assert plan.options == {"chunks": 1, "fallback": "no dispatch -> experts -> combine chain "
                                                     "to chunk"}


def test_off_is_the_plain_order_marked_off():
    """``off`` issues what sequential issues, and tells a runtime to skip the executor."""
    model, s = _decode_ep()
    off, seq = build_plan("off", model, s), build_plan("sequential", model, s)
    assert off.steps == seq.steps and off.options == {"off": True}
