"""The vLLM plugin's configuration and layer graphs: pure Python, no torch or vLLM needed."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlap.errors import ConfigError
from overlap.integrations.vllm.config import (
    ENV_VAR,
    KEYS,
    EngineFacts,
    OverlapConfig,
    check_engine,
    default_backend,
    load,
    parse,
    refusals,
    strategies,
)
from overlap.integrations.vllm.graph import layer_graph
from overlap.ops_graph import ModelGraph, OpKind
from overlap.plan import STRATEGIES, Batch, build_plan, split
from tests.strategies import batches


def test_absent_section_and_environment_leave_the_plugin_off() -> None:
    """No ``overlap`` entry and no environment variable: load returns None."""
    assert load({}, {}) is None
    assert load({"other_plugin": {"x": 1}}, {}) is None


def test_empty_section_turns_the_plugin_on_with_defaults() -> None:
    """``{"overlap": {}}`` enables the plugin with the documented defaults."""
    assert load({"overlap": {}}, {}) == OverlapConfig()


def test_enabled_false_turns_the_plugin_off() -> None:
    """``enabled: false`` wins over every other key."""
    assert load({"overlap": {"enabled": False, "strategy": "ascend_dbo"}}, {}) is None


def test_environment_variable_configures_the_plugin() -> None:
    """``OVERLAP_VLLM`` alone is enough to turn the plugin on."""
    config = load(None, {ENV_VAR: '{"strategy": "sglang_tbo", "microbatches": 3}'})
    assert (config.strategy, config.microbatches) == ("sglang_tbo", 3)


def test_additional_config_overrides_the_environment_per_key() -> None:
    """A key in additional_config wins; other environment keys are kept."""
    config = load({"overlap": {"strategy": "ascend_dbo"}},
                  {ENV_VAR: '{"strategy": "sglang_tbo", "min_tokens": 4}'})
    assert (config.strategy, config.min_tokens) == ("ascend_dbo", 4)


def test_unknown_key_lists_the_valid_keys() -> None:
    """A misspelt key fails with one message naming it and every valid key."""
    with pytest.raises(ConfigError, match=r"^unknown overlap config key\(s\) 'stratgy'; valid keys: "
                       + ", ".join(KEYS) + "$"):
        parse({"stratgy": "vllm_dbo"})


def test_unknown_strategy_lists_the_strategies() -> None:
    """A strategy name that is not registered lists the registered ones."""
    with pytest.raises(ConfigError, match=r"^'strategy' must be one of " + ", ".join(strategies())
                       + r" \(got 'fast'\)$"):
        parse({"strategy": "fast"})


def test_every_registered_strategy_is_offered() -> None:
    """The plugin offers each strategy record, the auto search included."""
    assert strategies() == tuple(STRATEGIES)


@pytest.mark.parametrize("value", [0, 1, 9, "two", 2.0, True])
def test_bad_microbatch_counts_are_refused(value: object) -> None:
    """Microbatches must be "auto" or an integer in 2..8."""
    with pytest.raises(ConfigError, match=r"^'microbatches' must be \"auto\" or an integer in 2\.\.8 "):
        parse({"microbatches": value})


def test_auto_microbatches_is_two() -> None:
    """``"auto"`` resolves to the two microbatches every built-in overlap strategy is written for."""
    assert parse({"microbatches": "auto"}).microbatches == 2


def test_sequential_uses_one_microbatch() -> None:
    """The sequential strategy runs the whole batch, whatever the configured count."""
    assert parse({"strategy": "sequential", "microbatches": 4}).microbatches == 1


def test_count_a_strategy_cannot_plan_is_refused_at_start_up() -> None:
    """deepseek_prefill is written for two microbatches, so three fails before any engine runs."""
    with pytest.raises(ConfigError, match=r"^'microbatches' 3 does not work with strategy "
                       r"'deepseek_prefill': strategy 'deepseek_prefill' needs 2 microbatches"):
        parse({"strategy": "deepseek_prefill", "microbatches": 3})


@pytest.mark.parametrize("key,value,message", [
    ("enabled", "yes", r"^'enabled' must be true or false \(got 'yes'\)$"),
    ("min_tokens", 0, r"^'min_tokens' must be an integer >= 1 \(got 0\)$"),
    ("max_imbalance", 1.5, r"^'max_imbalance' must be a number in \[0, 1\] \(got 1\.5\)$"),
    ("backend", "cuda", r"^'backend' must be one of auto, inline, threads, torch_streams, npu "
                        r"\(got 'cuda'\)$"),
    ("hardware", "tpu9", r"^unknown hardware 'tpu9'; valid: "),
    ("best_effort", 1, r"^'best_effort' must be true or false \(got 1\)$"),
])
def test_bad_values_name_the_key_and_the_choices(key: str, value: object, message: str) -> None:
    """Each bad value fails with a message naming the key and what it accepts."""
    with pytest.raises(ConfigError, match=message):
        parse({key: value})


def test_environment_variable_must_be_json() -> None:
    """A non-JSON environment variable fails with an example of the expected form."""
    with pytest.raises(ConfigError, match=r"^\$OVERLAP_VLLM must be a JSON object such as "):
        load(None, {ENV_VAR: "strategy=vllm_dbo"})


def test_section_must_be_an_object() -> None:
    """``"overlap": "on"`` is refused with the list of keys."""
    with pytest.raises(ConfigError, match=r"^additional_config\['overlap'\] must be a JSON object "):
        load({"overlap": "on"}, {})


@pytest.mark.parametrize("device,backend", [("cpu", "inline"), ("npu", "npu"),
                                            ("cuda", "torch_streams"), ("xpu", "torch_streams")])
def test_default_backend_follows_the_platform(device: str, backend: str) -> None:
    """auto picks inline on CPU, npu on Ascend and device streams on CUDA-like devices."""
    assert default_backend(device) == backend
    assert OverlapConfig().backend_for(device) == backend


def test_explicit_backend_is_kept_on_every_platform() -> None:
    """A backend named in the config is used as is."""
    assert parse({"backend": "threads"}).backend_for("cpu") == "threads"


@settings(deadline=None)
@given(st.sampled_from([s for s in strategies() if STRATEGIES[s].build is not None]),
       st.booleans(),
       st.integers(2, 6))
def test_every_strategy_plans_the_adapter_graphs(strategy: str, tensor_parallel: bool,
                                                 requests: int) -> None:
    """Each strategy that accepts two microbatches plans a dense + MoE model of adapter graphs."""
    tp = 2 if tensor_parallel else 1
    dense, moe = layer_graph(moe=False, tp=tp), layer_graph(moe=True, tp=tp)
    model = ModelGraph("tiny", [dense, moe, moe])
    plan = build_plan(strategy, model, split(Batch.prefill(4 * requests, requests), 2))
    assert len(plan.steps) == plan.n_micro * sum(len(g) for g in model.layers)


@pytest.mark.parametrize("tp,comms", [(1, 0), (2, 2)])
def test_tensor_parallel_all_reduces_are_comm_ops(tp: int, comms: int) -> None:
    """Only with tp > 1 does a layer graph carry its two all-reduces as communication ops."""
    assert len(layer_graph(moe=True, tp=tp).of_kind(OpKind.COMM)) == comms


def test_importing_the_plugin_package_imports_neither_torch_nor_vllm() -> None:
    """The entry-point module stays light until register() runs."""
    code = ("import sys, overlap.integrations.vllm; "
            "print(sorted(m for m in ('torch', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def _common(starts: list[int], seq_lens: list[int] | None) -> object:
    np = pytest.importorskip("numpy")
    from types import SimpleNamespace

    return SimpleNamespace(num_reqs=len(starts) - 1, query_start_loc_cpu=np.array(starts + [0]),
                           seq_lens_cpu_upper_bound=None if seq_lens is None else np.array(seq_lens))


def test_batch_of_reads_query_and_context_lengths_from_vllm_metadata() -> None:
    """Query lengths come from query_start_loc, context lengths from seq_lens minus them."""
    from overlap.integrations.vllm.metadata import batch_of

    assert batch_of(_common([0, 5, 6, 10], [5, 40, 12])) == Batch.of([(5, 0), (1, 39), (4, 8)])


def test_batch_of_refuses_a_request_without_new_tokens() -> None:
    """A zero-length query (which vLLM never schedules) gives no batch rather than a bad one."""
    from overlap.integrations.vllm.metadata import batch_of

    assert batch_of(_common([0, 5, 5], None)) is None


SMALL = OverlapConfig(min_tokens=1)  # lets the tiny batches below split


def _decide(batch: Batch | None, config: OverlapConfig, dp: int, others: list[int]):
    """decide_split with a fake DP all-reduce: the other ranks' wishes; records the calls."""
    from overlap.integrations.vllm.adapter import decide_split

    votes: list[int] = []

    def all_reduce_min(n: int) -> int:
        votes.append(n)
        return min([n, *others])

    planned, reason = decide_split(batch, config, dp, all_reduce_min)
    return planned, reason, votes


def test_single_rank_splits_without_voting() -> None:
    """With one data-parallel rank the split is local: no collective is issued."""
    planned, _, votes = _decide(Batch.of([(4, 0), (4, 0)]), SMALL, 1, [])
    assert (planned.token_counts, votes) == ((4, 4), [])


def test_rank_without_a_batch_still_votes_one() -> None:
    """A data-parallel rank that cannot split takes part in the vote, wishing one microbatch."""
    planned, _, votes = _decide(None, SMALL, 2, [2])
    assert (planned, votes) == (None, [1])


def test_a_refusing_rank_stops_every_rank_from_splitting() -> None:
    """When another rank wishes one microbatch, this rank runs the stock forward too."""
    planned, reason, votes = _decide(Batch.of([(4, 0), (4, 0)]), SMALL, 2, [1])
    assert (planned, reason, votes) == (None, "not split: another data-parallel rank refused", [2])


def test_too_few_requests_give_the_split_reason() -> None:
    """A single request is not cut: the reason comes from the planner's split."""
    planned, reason, _ = _decide(Batch.of([(8, 0)]), SMALL, 1, [])
    assert planned is None
    assert reason == "not split: 1 request(s) cannot fill 2 microbatches without splitting a request"


def test_sequential_never_votes() -> None:
    """One microbatch issues the stock collectives, so no data-parallel vote is needed."""
    planned, _, votes = _decide(Batch.of([(3, 0)]), parse({"strategy": "sequential"}), 4, [1])
    assert (planned.n, votes) == (1, [])


def test_default_threshold_leaves_small_decode_steps_to_the_stock_forward() -> None:
    """Eight decode tokens are below two microbatches of the default 16 tokens: not split."""
    planned, reason, _ = _decide(Batch.decode(8, 100), OverlapConfig(), 1, [])
    assert (planned, reason) == (None, "not split: 8 tokens < 2 x min_tokens 16")


# -- start-up refusals --------------------------------------------------------------------------

GOOD = EngineFacts(vllm_version="0.32.0")


def test_a_servable_engine_is_not_refused() -> None:
    """An eager engine on the tested vLLM, without DBO, LoRA or drafting: nothing to refuse."""
    assert refusals(GOOD) == []
    assert refusals(EngineFacts(vllm_version="0.32.1.dev3+g0123abc.cpu")) == []
    assert check_engine(OverlapConfig(), GOOD) == []


@pytest.mark.parametrize("facts,fix", [
    (EngineFacts(vllm_version="0.33.0"), "install vllm==0.32.*"),
    (EngineFacts(vllm_version="0.31.2"), "install vllm==0.32.*"),
    (EngineFacts(vllm_version="0.32.0", enable_dbo=True), "drop --enable-dbo / --ubatch-size"),
    (EngineFacts(vllm_version="0.32.0", ubatch_size=2), "drop --enable-dbo / --ubatch-size"),
    (EngineFacts(vllm_version="0.32.0", lora=True), "drop enable_lora / --enable-lora"),
    (EngineFacts(vllm_version="0.32.0", speculative=True), "drop speculative_config"),
    (EngineFacts(vllm_version="0.32.0", compiled=True), "pass enforce_eager=True"),
])
def test_each_unservable_engine_is_refused_naming_the_fix(facts: EngineFacts, fix: str) -> None:
    """Each condition gives one reason that says what to change, and one ConfigError."""
    (reason,) = refusals(facts)
    assert fix in reason
    with pytest.raises(ConfigError, match=r"^the overlap plugin cannot serve this engine: "):
        check_engine(OverlapConfig(), facts)


def test_ubatch_size_one_is_not_microbatching() -> None:
    """vLLM's ubatch_size 1 means no ubatching: not refused."""
    assert refusals(EngineFacts(vllm_version="0.32.0", ubatch_size=1)) == []


def test_every_reason_is_listed_in_one_error() -> None:
    """Several problems at once: one error listing all of them and the best-effort switch."""
    facts = EngineFacts(vllm_version="0.32.0", lora=True, compiled=True)
    with pytest.raises(ConfigError) as info:
        check_engine(OverlapConfig(), facts)
    message = str(info.value)
    assert "enable_lora" in message and "enforce_eager" in message
    assert message.endswith('(or set "best_effort": true to run with the plugin off)')


def test_best_effort_returns_the_reasons_instead_of_raising() -> None:
    """With best_effort the caller gets the reasons (it logs them and turns the plugin off)."""
    config = parse({"best_effort": True})
    assert check_engine(config, EngineFacts(vllm_version="0.32.0", compiled=True)) == [
        refusals(EngineFacts(vllm_version="0.32.0", compiled=True))[0]]


# -- shape buckets ------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(batches(), st.integers(min_value=2, max_value=4))
def test_shape_bucket_bounds_each_microbatch_within_a_power_of_two(batch: Batch, n: int) -> None:
    """A bucket entry is the microbatch's token count rounded up to a power of two (>= 16)."""
    from overlap.integrations.vllm.adapter import MIN_BUCKET, shape_bucket

    planned = split(batch, n, min_tokens=1)
    key = shape_bucket(planned)
    assert key[0] == planned.n
    for count, size in zip(planned.token_counts, key[1:], strict=True):
        assert size >= MIN_BUCKET and size & (size - 1) == 0
        assert count <= size and (size == MIN_BUCKET or size < 2 * count)


def test_steps_of_nearby_sizes_share_a_bucket() -> None:
    """Decode steps of 20+20 and 30+31 tokens reuse one executor; 20+40 does not."""
    from overlap.integrations.vllm.adapter import shape_bucket

    def key(*sizes: int) -> tuple[int, ...]:
        return shape_bucket(split(Batch.of([(s, 0) for s in sizes]), len(sizes), min_tokens=1))

    assert key(20, 20) == key(30, 31) == (2, 32, 32)
    assert key(20, 40) == (2, 32, 64)


# -- per-microbatch metadata: most-derived build, one builder per microbatch, guard ---------------

@pytest.fixture
def fake_ubatch_utils(monkeypatch: pytest.MonkeyPatch):
    """The common-metadata cut, faked: each microbatch's 'common metadata' is its token slice."""
    from overlap.integrations.vllm import metadata

    monkeypatch.setattr(metadata, "slice_common", lambda common, split, views=None: [
        (common, slice(m.token_start, m.token_end)) for m in split.micro])


class _BaseBuilder:
    """Stands in for MLACommonMetadataBuilder: built from recorded arguments, holds a buffer."""

    def __init__(self, spec: str, *, width: int = 1) -> None:
        from overlap.integrations.vllm.metadata import ARGS_ATTR

        self.__dict__.setdefault(ARGS_ATTR, ((spec,), {"width": width}))
        self.buffer = [0] * width
        self.builds = 0

    def build(self, common_prefix_len: int, common: object, fast_build: bool = False) -> dict:
        self.builds += 1
        return {"common": common, "by": self}


class _DerivedBuilder(_BaseBuilder):
    """Like AMX_MLA's builder: its build adds a field after the base build."""

    def build(self, common_prefix_len: int, common: object, fast_build: bool = False) -> dict:
        out = super().build(common_prefix_len, common, fast_build)
        out["req_to_token"] = common[1]
        return out


def _two_micro() -> object:
    return split(Batch.of([(4, 0), (6, 0)]), 2, min_tokens=1)


def test_microbatch_metadata_is_built_by_the_most_derived_build(fake_ubatch_utils) -> None:
    """Each microbatch's metadata comes from its own builder's subclass build (extra fields)."""
    from overlap.integrations.vllm.metadata import BuilderPool, Pending, build_microbatch_metadata

    step_builder = _DerivedBuilder("spec", width=3)
    builders = BuilderPool().get(step_builder, 2)
    subs = build_microbatch_metadata(Pending(step_builder, 0, "whole", False), _two_micro(),
                                     builders)
    assert [s["req_to_token"] for s in subs] == [slice(0, 4), slice(4, 10)]
    assert [s["by"] for s in subs] == builders and step_builder.builds == 0


def test_each_microbatch_gets_its_own_builder_made_like_the_original() -> None:
    """Clones: the builder's class, its constructor arguments, their own buffers; reused."""
    from overlap.integrations.vllm.metadata import BuilderPool

    pool, original = BuilderPool(), _DerivedBuilder("spec", width=3)
    first = pool.get(original, 2)
    assert len({id(b) for b in (original, *first)}) == 3
    assert all(type(b) is _DerivedBuilder and len(b.buffer) == 3 for b in first)
    assert first[0].buffer is not first[1].buffer
    assert pool.get(original, 2) == first
    original.__class__ = _BaseBuilder  # the platform swapped the class: clones follow
    assert all(type(b) is _BaseBuilder for b in pool.get(original, 2))


def test_a_builder_without_recorded_arguments_cannot_be_cloned() -> None:
    """A builder made before the hook was installed: one SplitError saying so."""
    from overlap.integrations.vllm.metadata import ARGS_ATTR, SplitError, clone_builder

    builder = _BaseBuilder("spec")
    del builder.__dict__[ARGS_ATTR]
    with pytest.raises(SplitError, match=r"^_BaseBuilder was constructed before the plugin's hook"):
        clone_builder(builder)


def test_a_failing_build_is_one_split_error_naming_the_builder(fake_ubatch_utils) -> None:
    """Whatever the builder raises becomes a SplitError (the adapter then runs the step stock)."""
    from overlap.integrations.vllm.metadata import Pending, SplitError, build_microbatch_metadata

    class Broken(_BaseBuilder):
        def build(self, *args: object) -> dict:
            raise KeyError("req_to_token")

    step_builder = Broken("spec")
    with pytest.raises(SplitError, match=r"^Broken could not build microbatch metadata: "
                                         r"KeyError: 'req_to_token'$"):
        build_microbatch_metadata(Pending(step_builder, 0, "whole", False), _two_micro(),
                                  [Broken("spec"), Broken("spec")])


def test_rebuilds_are_guarded_against_re_entry(fake_ubatch_utils) -> None:
    """While rebuilding, the hook sees ``rebuilding()``; a nested rebuild is refused."""
    from overlap.integrations.vllm.metadata import (
        Pending,
        SplitError,
        build_microbatch_metadata,
        rebuilding,
    )

    seen: list[bool] = []

    class Nested(_BaseBuilder):
        def build(self, *args: object) -> dict:
            seen.append(rebuilding())
            build_microbatch_metadata(Pending(self, 0, "whole", False), _two_micro(), [self, self])
            return {}

    with pytest.raises(SplitError, match="re-entered"):
        build_microbatch_metadata(Pending(Nested("s"), 0, "whole", False), _two_micro(),
                                  [Nested("s"), Nested("s")])
    assert seen == [True] and not rebuilding()


@pytest.mark.parametrize(("local_fails", "peer_fails"), [(True, False), (False, True),
                                                         (False, False)])
def test_data_parallel_ranks_agree_to_run_a_step_stock_when_one_cannot_split(
        fake_ubatch_utils, monkeypatch: pytest.MonkeyPatch, local_fails: bool,
        peer_fails: bool) -> None:
    """With data parallelism every rank votes after building its microbatch metadata, before
    any collective of the step: one rank that cannot build makes every rank run the step stock
    (a rank planning while another runs stock would pair mismatched collectives and hang)."""
    from collections import Counter
    from types import SimpleNamespace

    from overlap.integrations.vllm import metadata
    from overlap.integrations.vllm.adapter import DeepseekOverlap
    from overlap.integrations.vllm.metadata import BuilderPool, Pending, SplitError, StepViews

    monkeypatch.setattr(metadata, "microbatch_contexts", lambda *args: ["ctx0", "ctx1"])

    class Broken(_BaseBuilder):
        def build(self, *args: object) -> dict:
            raise KeyError("req_to_token")

    votes: list[int] = []
    gathered: list[bool] = []
    a = DeepseekOverlap.__new__(DeepseekOverlap)
    a.dp, a.timer, a._builders, a._views, a.stats = 2, None, BuilderPool(), StepViews(), Counter()
    a._all_reduce_min = lambda n: votes.append(n) or (0 if peer_fails else n)
    a._dp_metadata = lambda ctx, planned: gathered.append(True) or [None, None]
    step_builder = (Broken if local_fails else _BaseBuilder)("spec")
    ctx = SimpleNamespace(dp_metadata=object(), attn_metadata={}, slot_mapping={},
                          is_padding=None)
    pendings = {1: Pending(step_builder, 0, "whole", False)}
    if local_fails or peer_fails:
        with pytest.raises(SplitError) as info:
            a._contexts(ctx, _two_micro(), pendings)
        assert str(info.value).startswith("Broken could not build" if local_fails else
                                          "another data-parallel rank could not build")
        assert gathered == []  # no collective of the step was entered
    else:
        a._contexts(ctx, _two_micro(), pendings)
        assert gathered == [True]
    assert votes == [0 if local_fails else 1]
