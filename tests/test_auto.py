"""The ``auto`` strategy: its search, its guarantee against the named strategies, and its cache."""

from __future__ import annotations

import pytest

from overlap.backends.simulated import simulate
from overlap.errors import ConfigError
from overlap.ops_graph.templates import ParallelConfig, build_model
from overlap.plan import NAMED, Batch, build_plan, split, validate
from overlap.plan.stages import STAGES
from overlap.plan.strategies.deepseek import DECODE, PREFILL
from overlap.search import PlanCache, Planner, ShapeKey, bucket, search, templates_graphs
from overlap.search.evaluator import steady_layers
from overlap.search.space import orders, split_at
from tests.timeouts import deadline

# (phase, hardware, parallel, batch, comm mode): small but each a different regime.
SCENARIOS = {
    "prefill-910b2-ep16": ("prefill", "910b2", ParallelConfig(ep=16), Batch.prefill(4096, 2), "normal"),
    "decode-h800-ep32": ("decode", "h800", ParallelConfig(ep=32), Batch.decode(128, 4096),
                         "low_latency"),
    "prefill-910c-tp16": ("prefill", "910c", ParallelConfig(tp=16), Batch.prefill(4096, 4), "normal"),
    # small batches, where two microbatches lose and many one-microbatch plans nearly tie
    "decode-h800-ep32-small": ("decode", "h800", ParallelConfig(ep=32), Batch.decode(32, 4096),
                               "low_latency"),
    "prefill-910b2-tp8-small": ("prefill", "910b2", ParallelConfig(tp=8), Batch.prefill(32, 1),
                                "normal"),
}


@pytest.fixture(autouse=True)
def _timeout():
    """Fail a test that runs past 60 s instead of hanging the suite."""
    with deadline(60):
        yield


def _model(parallel=None, phase="prefill", layers=5):
    parallel = parallel or ParallelConfig(ep=16)
    return build_model("deepseek-v3", parallel, phase=phase, num_layers=layers)


def test_search_plan_validates():
    """The searched plan passes validation and is named ``auto``."""
    plan = search(_model(), Batch.prefill(4096, 2), "910b2", progress=False).plan
    assert validate(plan) is plan
    assert plan.strategy == "auto"


def test_auto_through_build_plan_says_it_needs_hardware():
    """``auto`` is a search, not a function of (graph, split): build_plan says what to call."""
    with pytest.raises(ConfigError, match=r"^strategy 'auto' is a search and needs hardware to "
                                          r"score plans on: use overlap\.search\.search"):
        build_plan("auto", _model(), split(Batch.prefill(4096, 2), 2))


def test_planner_without_hardware_says_what_to_pass():
    """A Planner needs a preset or a calibrated Hardware; none is refused, listing the presets."""
    with pytest.raises(ConfigError, match=r"^strategy 'auto' searches under a cost model and "
                                          r"needs hardware: pass a preset \(910b2, "):
        Planner("deepseek-v3", ParallelConfig(ep=16))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_auto_never_slower_than_best_named(name):
    """The searched plan's simulated step time is at most every named strategy's."""
    phase, hw, par, batch, mode = SCENARIOS[name]
    model = _model(par, phase)
    result = search(model, batch, hw, graphs=templates_graphs("deepseek-v3", par, phase=phase,
                                                              num_layers=5),
                    attention="one", comm_mode=mode, progress=False)
    named = {n: simulate(build_plan(n, model, split(batch, 2, split_requests=True)), hw,
                         comm_mode=mode).makespan for n in NAMED}
    assert simulate(result.plan, hw, comm_mode=mode).makespan == pytest.approx(result.step_s)
    assert result.step_s <= min(named.values()) * (1 + 1e-9), (result.choice.describe(), named)


def test_search_reports_its_work():
    """A search says how many candidates it scored and how long it took."""
    result = search(_model(), Batch.prefill(4096, 2), "910b2", progress=False)
    assert result.evaluated > len(NAMED)
    assert result.elapsed_s > 0


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_generated_order_names_each_stage_once_per_microbatch(n):
    """Each generated pattern issues every (microbatch, stage) exactly once."""
    for name, pattern in orders(n):
        pairs = sorted((m, s) for _, m, s in pattern)
        assert pairs == sorted((m, s) for m in range(n) for s in STAGES), name


@pytest.mark.parametrize(("order", "named"), [("deepseek_prefill_n", PREFILL),
                                             ("deepseek_decode_n", DECODE)])
def test_deepseek_orders_generalise_the_named_patterns(order, named):
    """For two microbatches the generalised DeepSeek orders are exactly the named patterns."""
    assert list(dict(orders(2))[order]) == named


def test_split_at_cuts_at_the_requested_share():
    """``split_at`` puts the boundary at the requested fraction of the tokens."""
    parts = split_at(Batch.prefill(1000, 1), (0.4,))
    assert parts.token_counts == (400, 600)
    assert parts.micro[1].pieces[0].context_len == 400


def test_steady_state_extrapolation_is_close_to_full_depth():
    """Two- and one-layer steady-state runs predict the 30-layer step time within 2%."""
    model = build_model("deepseek-v3", ParallelConfig(ep=16), num_layers=30)
    batch = Batch.prefill(4096, 2)
    plan = lambda m: build_plan("deepseek_prefill", m, split(batch, 2))  # noqa: E731
    t2, t1 = (simulate(plan(steady_layers(model, k)), "910b2").makespan for k in (2, 1))
    full = simulate(plan(model), "910b2").makespan
    assert t2 + 28 * (t2 - t1) == pytest.approx(full, rel=0.02)


# -- errors --------------------------------------------------------------------------------------


def test_micro_counts_out_of_range_is_a_clear_error():
    """A microbatch count outside 1..4 names the valid ones."""
    message = r"'micro_counts' must be a non-empty subset of 1, 2, 3, 4 \(got \(0,\)\)"
    with pytest.raises(ConfigError, match=message):
        search(_model(), Batch.prefill(64), "910b2", micro_counts=(0,))


def test_batch_of_wrong_type_is_a_clear_error():
    """Passing a split (or anything else) where a Batch belongs says so."""
    with pytest.raises(ConfigError, match="'batch' must be a Batch \\(got Split\\)"):
        search(_model(), split(Batch.prefill(64), 1), "910b2")


def test_unknown_hardware_is_a_clear_error():
    """An unknown hardware preset lists the valid ones."""
    with pytest.raises(ConfigError, match="unknown hardware 'tpu'; valid: 910b2"):
        search(_model(), Batch.prefill(64), "tpu")


def test_top_below_one_is_a_clear_error():
    """``top`` must keep at least one candidate."""
    with pytest.raises(ConfigError, match=r"'top' must be >= 1 \(got 0\)"):
        search(_model(), Batch.prefill(64), "910b2", top=0)


def test_bad_phase_in_shape_key_is_a_clear_error():
    """A phase other than prefill/decode lists the valid ones."""
    with pytest.raises(ConfigError, match=r"'phase' must be one of prefill, decode \(got 'mixed'\)"):
        ShapeKey.of("mixed", 1, 1, 0)


def test_cache_capacity_below_one_is_a_clear_error():
    """A cache must hold at least one entry."""
    with pytest.raises(ConfigError, match=r"'capacity' must be >= 1 \(got 0\)"):
        PlanCache(capacity=0)


# -- cache ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (1, 1), (3, 4), (4096, 4096), (4097, 8192)])
def test_bucket_rounds_up_to_a_power_of_two(value, expected):
    """Counts are bucketed to the next power of two."""
    assert bucket(value) == expected


def test_cache_evicts_the_least_recently_used():
    """A full cache drops the entry used longest ago."""
    cache = PlanCache(capacity=2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.get("a")
    cache.put("c", 3)
    assert (cache.get("b"), cache.get("a"), cache.get("c")) == (None, 1, 3)


def _planner():
    return Planner("deepseek-v3", ParallelConfig(ep=16), "910b2", num_layers=5)


def test_planner_cache_hit_returns_the_identical_plan():
    """Asking twice for the same batch returns the very same plan object, from the cache."""
    planner = _planner()
    batch = Batch.prefill(4096, 2)
    first = planner.plan(batch)
    assert planner.plan(batch) is first
    assert (planner.cache.hits, planner.cache.misses) == (1, 1)


def test_planner_same_bucket_reuses_the_decision():
    """Another batch of the same bucket is planned without a new search."""
    planner = _planner()
    planner.plan(Batch.prefill(4000, 2))
    plan = planner.plan(Batch.prefill(3000, 2))
    assert plan.split.batch.tokens == 3000
    assert (planner.cache.hits, planner.cache.misses, len(planner.cache)) == (1, 1, 1)


def test_planner_different_bucket_misses():
    """A batch in another token bucket triggers a new search."""
    planner = _planner()
    planner.plan(Batch.prefill(4096, 2))
    planner.plan(Batch.prefill(8192, 2))
    assert (planner.cache.hits, planner.cache.misses, len(planner.cache)) == (0, 2, 2)


def test_planner_lookup_finds_the_searched_bucket():
    """The hot-path lookup by figures returns the decision cached for that bucket."""
    planner = _planner()
    result = planner.search(Batch.decode(100, 4000))
    assert planner.lookup("decode", 128, 128, 4096) == result.choice
    assert planner.lookup("decode", 256, 256, 4096) is None


def test_auto_schedules_models_whose_layers_alternate_in_arity():
    """A model whose last layer cannot feed a copy of itself is searched whole, not by proxy."""
    from overlap.ops_graph import GraphBuilder, ModelGraph

    two_in = GraphBuilder("two_in", ("x", "y"))
    two_in.compute("a", ("x", "y"), "z").comm("d", "all_to_all", "ep", "z", "w", size=2)
    one_in = GraphBuilder("one_in", ("w",)).compute("c", "w", ("p", "q"))
    model = ModelGraph("alternating", [one_in.build(("p", "q")), two_in.build("w")] * 6)
    plan = search(model, Batch.prefill(64, 4), "910b2", progress=False).plan
    assert plan.n_layers == 12
