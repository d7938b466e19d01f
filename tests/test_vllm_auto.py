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
