"""The reference DeepSeek block: its graph is the template's, and its forward behaves like MLA/MoE."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from overlap.errors import ConfigError, OverlapError  # noqa: E402
from overlap.ops_graph import OpKind  # noqa: E402
from overlap.ops_graph.templates import ParallelConfig, layer_graph  # noqa: E402
from overlap.plan import Batch  # noqa: E402
from overlap.reference import TINY, ExpertParallel, ReferenceConfig, ReferenceModel  # noqa: E402


@pytest.fixture(scope="module")
def model() -> ReferenceModel:
    return ReferenceModel(TINY, num_layers=2)


def _shape(graph):
    return [(o.name, o.kind, o.role, o.reads, o.writes,
             o.comm.collective if o.comm else None, o.comm.group if o.comm else None)
            for o in graph]


@pytest.mark.parametrize("attention", ["one", "two_stage", "fine"])
@pytest.mark.parametrize("routed", [False, True])
def test_block_graph_matches_the_deepseek_template(model, attention, routed):
    """At every attention grain the block's graph has the template's ops, roles and values."""
    block = model.blocks[1 if routed else 0]
    template = layer_graph(TINY, ParallelConfig(ep=2), routed=routed, attention=attention)
    assert _shape(block.graph(attention)) == _shape(template)


def test_block_graph_binds_every_op_to_the_block(model):
    """Every op of the block's graph carries a callable."""
    assert all(o.fn is not None for g in model.graphs("fine") for o in g)


def test_block_graph_takes_costs_from_the_template(model):
    """The block's ops cost what the single-process template says, so the graph can be simulated."""
    template = layer_graph(TINY, ParallelConfig(), routed=True, attention="fine")
    graph = model.blocks[1].graph("fine")
    assert graph["experts"].cost == template["experts"].cost
    assert graph["core_attn"].cost == template["core_attn"].cost


def test_comm_ops_take_the_expert_parallel_size():
    """dispatch and combine are all-to-alls on group 'ep' sized by the block's expert parallelism."""
    graph = ReferenceModel(TINY, num_layers=2).blocks[1].graph()
    comms = graph.of_kind(OpKind.COMM)
    assert [(o.name, str(o.comm)) for o in comms] == [("dispatch", "all_to_all@ep[1]"),
                                                     ("combine", "all_to_all@ep[1]")]


def test_importing_the_reference_package_does_not_import_torch():
    """`import overlap.reference` stays torch-free until a model class is touched."""
    code = "import sys, overlap, overlap.reference; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def _forward(model, batch, hidden, cache=None):
    cache = cache if cache is not None else model.cache()
    residual = torch.zeros_like(hidden)
    return model.plain_forward(hidden, residual, model.step(batch, cache))["hidden_out"]


def test_attention_is_causal(model):
    """Changing a token changes no output of the tokens before it."""
    batch = Batch.of([(6, 0)])
    hidden = model.inputs(6)["hidden"]
    changed = hidden.clone()
    changed[4] += 1.0
    a, b = _forward(model, batch, hidden), _forward(model, batch, changed)
    assert torch.equal(a[:4], b[:4])
    assert not torch.equal(a[4], b[4])


def test_a_request_does_not_see_the_other_requests(model):
    """A request's output is the same bits alone and beside another request."""
    hidden = model.inputs(9)["hidden"]
    together = _forward(model, Batch.of([(4, 0), (5, 0)]), hidden)
    alone = _forward(model, Batch.of([(5, 0)]), hidden[4:])
    assert torch.equal(together[4:], alone)


def test_decode_after_prefill_equals_a_longer_prefill(model):
    """Prefilling 5 tokens then decoding the 6th gives the 6th token what a 6-token prefill does."""
    hidden = model.inputs(6)["hidden"]
    full = _forward(model, Batch.of([(6, 0)]), hidden)
    cache = model.cache()
    _forward(model, Batch.of([(5, 0)]), hidden[:5], cache)
    decoded = _forward(model, Batch.of([(1, 5)]), hidden[5:], cache)
    assert torch.equal(decoded[0], full[5])


def test_decode_reads_the_cached_context(model):
    """A decode token's output depends on what the KV cache holds for its request."""
    hidden = model.inputs(1)["hidden"]
    a = _forward(model, Batch.of([(1, 4)]), hidden, model.cache({0: 4}, seed=1))
    b = _forward(model, Batch.of([(1, 4)]), hidden, model.cache({0: 4}, seed=2))
    assert not torch.equal(a, b)


def test_routing_picks_k_experts_from_at_most_topk_group_groups(model):
    """Each token gets num_experts_per_tok experts, within topk_group groups, weights summing to
    routed_scaling_factor."""
    block, cfg = model.blocks[1], model.cfg
    hidden = model.inputs(16, seed=3)["hidden"]
    with model.step(Batch.of([(16, 0)]), model.cache()).whole():
        _, _, topk = block.gate(hidden, torch.zeros_like(hidden))
    chosen = topk != 0
    assert chosen.sum(-1).tolist() == [cfg.model.num_experts_per_tok] * 16
    groups = chosen.view(16, cfg.n_group, -1).any(-1).sum(-1)
    assert int(groups.max()) <= cfg.topk_group
    torch.testing.assert_close(topk.sum(-1), torch.full((16,), cfg.routed_scaling_factor))


def test_routing_bias_steers_the_choice_but_not_the_weights(model):
    """A large bias on one expert makes every token pick it; its weight still comes from the score."""
    block = model.blocks[1]
    hidden = model.inputs(8, seed=4)["hidden"]
    saved = block.router_bias.clone()
    try:
        block.router_bias[5] = 100.0
        with model.step(Batch.of([(8, 0)]), model.cache()).whole():
            _, _, topk = block.gate(hidden, torch.zeros_like(hidden))
    finally:
        block.router_bias.copy_(saved)
    assert bool((topk[:, 5] > 0).all())
    assert float(topk[:, 5].max()) < model.cfg.routed_scaling_factor


def test_fast_kernels_agree_with_exact_ones_within_float_tolerance():
    """torch's own matmul and activations give the exact kernels' result to about 1e-5."""
    batch = Batch.of([(5, 0), (1, 3)])
    exact, fast = ReferenceModel(TINY, num_layers=2), ReferenceModel(TINY, num_layers=2, exact=False)
    hidden = exact.inputs(6)["hidden"]
    a = _forward(exact, batch, hidden, exact.cache({1: 3}))
    b = _forward(fast, batch, hidden, fast.cache({1: 3}))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_an_attention_op_outside_a_step_says_how_to_run_it(model):
    """Calling an op that needs batch metadata without a step context raises OverlapError."""
    with pytest.raises(OverlapError, match="op 'q_rope' needs the batch metadata but ran outside a step"):
        model.blocks[0].q_rope(torch.zeros(2, 48))


def test_a_context_longer_than_the_cache_is_rejected(model):
    """A request claiming more context than its cache holds is refused when the step is made."""
    with pytest.raises(ConfigError, match="request 0 has context_len 4 but the KV cache of layer 0 "
                                          "holds 2 rows for it"):
        model.step(Batch.of([(1, 4)]), model.cache({0: 2}))


def test_request_ids_must_name_each_request_once(model):
    """request_ids of the wrong length are refused."""
    with pytest.raises(ConfigError, match=r"'request_ids' must name each of the 2 requests once "
                                          r"\(got \[7\]\)"):
        model.step(Batch.of([(1, 0), (1, 0)]), model.cache(), request_ids=[7])


def test_group_count_must_divide_the_experts():
    """n_group that does not divide n_routed_experts is a ConfigError (the model config says so
    before the reference config would)."""
    with pytest.raises(ConfigError, match=r"^'n_routed_experts' \(8\) must be divisible by "
                                          r"'n_group' \(3\)$"):
        ReferenceConfig.tiny(n_group=3, topk_group=1)


def test_expert_parallelism_over_several_ranks_needs_a_group():
    """ExpertParallel(size=2) without a process group is refused."""
    with pytest.raises(ConfigError, match="expert parallelism over 2 ranks needs a process group"):
        ExpertParallel(size=2, rank=0)


def test_a_model_without_low_rank_queries_is_refused():
    """DeepSeek-V2-Lite style configs (no q_lora_rank) are not supported by the reference block."""
    with pytest.raises(ConfigError, match="the reference block needs 'q_lora_rank'"):
        ReferenceModel({**TINY, "q_lora_rank": None}, num_layers=1)
