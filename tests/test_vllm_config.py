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
    OverlapConfig,
    default_backend,
    load,
    parse,
    strategies,
)
from overlap.integrations.vllm.graph import layer_graph
from overlap.ops_graph import ModelGraph, OpKind
from overlap.plan import STRATEGIES, Batch, build_plan, split


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


def test_every_registered_strategy_but_auto_is_offered() -> None:
    """The plugin offers each registered strategy except the auto search."""
    assert set(strategies()) == set(STRATEGIES) - {"auto"}


def test_auto_strategy_is_refused_with_the_reason() -> None:
    """``auto`` fails at start-up saying why, and lists what works instead."""
    with pytest.raises(ConfigError, match=r"^'strategy' 'auto' is not supported by the vLLM plugin: "
                       r"the adapter's ops carry no cost figures"):
        parse({"strategy": "auto"})


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
@given(st.sampled_from([s for s in strategies() if s != "sequential"]), st.booleans(),
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
