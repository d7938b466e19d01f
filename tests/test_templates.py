"""Model templates: op structure per parallel mode and cost figures checked by hand."""

from __future__ import annotations

import json

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlap import ConfigError
from overlap.ops_graph import Collective, OpKind, Role, Shape
from overlap.ops_graph.templates import ModelConfig, ParallelConfig, build_model, layer_graph, load_model
from overlap.ops_graph.templates.config import PRESETS

EP16 = ParallelConfig(ep=16)
T = 4096


def test_deepseek_v3_has_3_dense_then_58_moe_layers():
    """first_k_dense_replace=3 of 61 layers, each kind one shared graph."""
    m = build_model("deepseek-v3", EP16)
    assert len(m) == 61
    assert [g.name for g in m.distinct()] == ["deepseek-v3.dense", "deepseek-v3.moe"]
    assert m.layers[2].name == "deepseek-v3.dense" and m.layers[3].name == "deepseek-v3.moe"


def test_ep_moe_layer_ops():
    """EP MoE layer: attention, gate, dispatch, permute, experts, unpermute, combine, shared
    experts, merge."""
    g = layer_graph("deepseek-v3", EP16)
    assert g.order == ("attn", "gate", "dispatch", "permute", "experts", "unpermute", "combine",
                       "shared", "merge")
    assert g["dispatch"].comm.collective is Collective.ALL_TO_ALL and g["dispatch"].comm.size == 16
    assert g["shared"].reads == ("moe_in",)  # beside dispatch, not after it
    assert len(g.of_kind(OpKind.COMM)) == 2


def test_attention_grains():
    """Attention as one op, two stages, or MLA's fine ops."""
    assert len(layer_graph("deepseek-v3", EP16, attention="one").of_role(Role.ATTN)) == 1
    two = layer_graph("deepseek-v3", EP16, attention="two_stage")
    assert [o.name for o in two.ops[:2]] == ["attn0", "attn1"]
    fine = layer_graph("deepseek-v3", EP16, attention="fine")
    assert [o.name for o in fine.of_role(Role.MLA_VECTOR)] == ["q_norm", "q_rope", "kv_prep",
                                                               "kv_expand"]
    assert [o.name for o in fine.of_role(Role.MLA_MATRIX)] == ["q_a", "q_b", "kv_a", "kv_b"]
    decode = layer_graph("deepseek-v3", EP16, attention="fine", phase="decode")
    assert "kv_b" not in decode and "kv_expand" not in decode  # absorbed: no per-context up-proj


def test_grains_have_the_same_total_cost():
    """Fusing ops never changes the layer's total work."""
    shape = Shape.prefill(T, 4)
    totals = []
    for grain in ("one", "two_stage", "fine"):
        g = layer_graph("deepseek-v3", EP16, attention=grain)
        totals.append(sum(c.flops for c in g.cost(shape).values()))
    assert totals[0] == pytest.approx(totals[1]) == pytest.approx(totals[2])


def test_tp_path_all_reduces_attention_and_moe():
    """Pure TP: o_proj all-reduce and MoE all-reduce on the tp group."""
    g = layer_graph("deepseek-v3", ParallelConfig(tp=16))
    comms = [(o.name, o.comm.collective, o.comm.group) for o in g.of_kind(OpKind.COMM)]
    assert comms == [("attn_allreduce", Collective.ALL_REDUCE, "tp"),
                     ("ffn_allreduce", Collective.ALL_REDUCE, "tp")]


def test_all_gather_moe_path():
    """All-gather MoE: gather before the experts, reduce-scatter after."""
    g = layer_graph("deepseek-v3", ParallelConfig(tp=16, moe_comm="all_gather"))
    comms = [(o.name, o.comm.collective) for o in g.of_kind(OpKind.COMM)]
    assert comms == [("ffn_gather", Collective.ALL_GATHER), ("ffn_scatter", Collective.REDUCE_SCATTER)]


def test_deepseek_v3_flops_by_hand():
    """Per-token matmul FLOPs of DeepSeek-V3 (EP16, prefill) match the figures in docs/ops_graph.md."""
    g = layer_graph("deepseek-v3", EP16, attention="fine")
    shape = Shape.prefill(T)
    flops = {name: c.flops / T for name, c in g.cost(shape).items()}
    assert flops["q_a"] == 2 * 7168 * 1536 == 22_020_096
    assert flops["kv_a"] == 2 * 7168 * 576 == 8_257_536
    assert flops["q_b"] == 2 * 1536 * 128 * 192 == 75_497_472
    assert flops["o_proj"] == 2 * 128 * 128 * 7168 == 234_881_024
    assert flops["gate"] == 2 * 7168 * 256 == 3_670_016
    assert flops["experts"] == 8 * 3 * 2 * 7168 * 2048 == 704_643_072
    assert flops["shared"] == 3 * 2 * 7168 * 2048 == 88_080_384
    # Prefill attention: kv_b up-projects each context token; scores and values per pair.
    pairs = T * (T + 1) // 2
    assert g["kv_b"].cost(shape).flops == 2 * 512 * 128 * 256 * T
    assert g["core_attn"].cost(shape).flops == 2 * 128 * 320 * pairs
    dense = layer_graph("deepseek-v3", EP16, routed=False)
    assert dense["mlp"].cost(shape).flops / T == 3 * 2 * 7168 * 18432 == 792_723_456


def test_deepseek_v3_decode_uses_absorbed_attention():
    """Decode attention works in the 512-wide latent space: 278,528 FLOPs per pair."""
    g = layer_graph("deepseek-v3", EP16, attention="fine", phase="decode")
    shape = Shape.decode(1, 4095)
    per_token = 2 * 128 * 512 * 256
    assert g["core_attn"].cost(shape).flops == per_token + 278_528 * 4096


def test_deepseek_v3_comm_and_expert_weight_bytes():
    """Dispatch/combine move top-k copies of each token; expert weights saturate at 16 experts."""
    g = layer_graph("deepseek-v3", EP16)
    shape = Shape.prefill(T)
    assert g["dispatch"].cost(shape).comm_bytes == T * 8 * 7168 * 2
    assert layer_graph("deepseek-v3", EP16, dtype="fp8")["dispatch"].cost(shape).comm_bytes == T * 8 * 7168
    weights = 16 * 3 * 7168 * 2048 * 2
    big = g["experts"].cost(Shape.prefill(1_000_000)).hbm_bytes
    assert big == pytest.approx(weights + 1_000_000 * g["experts"].cost.hbm_bytes.per_token)
    one = g["experts"].cost(Shape(tokens=1)).hbm_bytes - g["experts"].cost.hbm_bytes.per_token
    assert one == pytest.approx(weights * (1 - (1 - 8 / 256) ** 16))


def test_qwen3_moe_has_no_shared_experts_or_merge():
    """Qwen3-MoE: GQA attention, every layer MoE, combine writes the output directly."""
    m = build_model("qwen3-moe-30b", ParallelConfig(ep=8))
    assert len(m) == 48 and len(m.distinct()) == 1
    g = m.layers[0]
    assert g.order == ("attn", "gate", "dispatch", "permute", "experts", "unpermute", "combine")
    assert g["combine"].writes == ("hidden_out",)
    fine = layer_graph("qwen3-moe-30b", ParallelConfig(ep=8), attention="fine")
    assert fine["qkv"].cost(Shape.prefill(10)).flops == 10 * 2 * 2048 * (32 + 8) * 128


def test_model_from_hf_config_file(tmp_path):
    """A config.json path works like a preset."""
    from overlap.ops_graph.templates.config import PRESETS

    path = tmp_path / "config.json"
    path.write_text(json.dumps(PRESETS["deepseek-v2-lite"]))
    cfg = load_model(str(path))
    assert cfg.q_lora_rank is None and cfg.n_shared_experts == 2
    assert "q_proj" in layer_graph(cfg, ParallelConfig(ep=2), attention="fine")


@pytest.mark.parametrize(("spec", "message"), [
    ("gpt-2", "unknown model 'gpt-2'; valid: deepseek-v3"),
    ({"model_type": "llama"}, "unsupported model_type 'llama'; supported: deepseek_v2"),
    ({"model_type": "deepseek_v3"}, "config of 'deepseek_v3' lacks the field 'hidden_size'"),
    ("/nonexistent/config.json", "model config '/nonexistent/config.json' does not exist"),
])
def test_bad_model_specs(spec, message):
    """Bad model specs give one clear ConfigError."""
    with pytest.raises(ConfigError, match=message):
        load_model(spec)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tp": 0}, "'tp' must be >= 1 .got 0."),
    ({"ep": 1, "moe_comm": "all_to_all"}, "all_to_all needs ep > 1"),
    ({"ep": 4, "moe_comm": "all_reduce"}, "needs ep=1 .got ep=4."),
    ({"moe_comm": "ring"}, "'moe_comm' must be one of all_to_all, all_reduce, all_gather"),
])
def test_bad_parallel_configs(kwargs, message):
    """Invalid parallel configurations are refused with the valid choices."""
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(**kwargs)


def test_bad_template_arguments():
    """Phase, attention grain, dtype and head split are checked."""
    with pytest.raises(ConfigError, match="'phase' must be one of prefill, decode"):
        layer_graph("deepseek-v3", phase="train")
    with pytest.raises(ConfigError, match="'attention' must be one of one, two_stage, fine"):
        layer_graph("deepseek-v3", attention="half")
    with pytest.raises(ConfigError, match="'dtype' must be one of bf16, int8, fp8 .got 'fp4'."):
        layer_graph("deepseek-v3", dtype="fp4")
    with pytest.raises(ConfigError, match=r"num_heads \(128\) must be divisible by the attention tp \(3\)"):
        layer_graph("deepseek-v3", ParallelConfig(tp=3))
    with pytest.raises(ConfigError, match="'num_experts_per_tok' .300. must be <="):
        ModelConfig.from_hf({**_v3(), "num_experts_per_tok": 300})


def _v3():
    from overlap.ops_graph.templates.config import PRESETS

    return dict(PRESETS["deepseek-v3"])


def test_single_rank_moe_has_no_collectives():
    """With tp=1 and ep=1 every expert is local: no size-1 collective is planned."""
    g = layer_graph("deepseek-v3", ParallelConfig())
    assert g.of_kind(OpKind.COMM) == ()
    assert g.order == ("attn", "gate", "permute", "experts", "unpermute", "shared", "merge")


def test_deepseek_v3_expert_all_to_alls_carry_its_group_limited_routing():
    """Dispatch and combine say how tokens fan out (top-8 of 256 in 4 of 8 groups), so the cost
    model can count DeepEP's once-per-node sends."""
    from overlap.ops_graph import Routing

    model = build_model("deepseek-v3", ParallelConfig(ep=64), num_layers=4)
    moe = model.layers[3]
    assert moe["dispatch"].comm.routing == moe["combine"].comm.routing == Routing(8, 256, 8, 4)


def test_group_count_must_divide_the_experts():
    """A config whose n_group does not split the routed experts is refused by name."""
    config = {**PRESETS["deepseek-v3"], "n_group": 7}
    with pytest.raises(ConfigError, match=r"^'n_routed_experts' \(256\) must be divisible by "
                                          r"'n_group' \(7\)$"):
        ModelConfig.from_hf(config)


def test_fp8_gemms_read_their_own_cast_input():
    """Under fp8 every FP8 GEMM reads a ``<gemm>_quant`` op's output (one cast of the FFN input
    for the dispatch and the shared experts); bf16 has no cast op."""
    fp8 = layer_graph("deepseek-v3", ParallelConfig(ep=64), attention="fine", dtype="fp8")
    for gemm in ("q_a", "kv_a", "q_b", "kv_b", "o_proj"):
        (value,) = fp8[gemm].reads
        assert fp8.producer[value] == f"{gemm}_quant", gemm
    assert fp8["dispatch"].reads[0] == fp8["shared"].reads[0] == "ffn_in"
    assert fp8.producer["ffn_in"] == "ffn_quant"
    assert [o.name for o in fp8.of_role(Role.QUANT)] == [
        "q_a_quant", "q_b_quant", "kv_a_quant", "kv_b_quant", "o_proj_quant", "ffn_quant"]
    bf16 = layer_graph("deepseek-v3", ParallelConfig(ep=64), attention="fine")
    assert bf16.of_role(Role.QUANT) == ()
    decode = layer_graph("deepseek-v3", ParallelConfig(ep=64), attention="fine", phase="decode",
                         dtype="fp8")
    assert "kv_b_quant" not in decode  # the absorbed form has no kv_b GEMM


def test_casts_and_permutes_join_the_stages_of_their_work():
    """A cast runs in its producer's stage (ffn_quant after the router, so the dispatch sends
    FP8); permute and unpermute run with the experts, in every parallel mode."""
    from overlap.plan.stages import stages

    for par in (ParallelConfig(ep=64), ParallelConfig(tp=4),
                ParallelConfig(tp=4, moe_comm="all_gather")):
        got = stages(layer_graph("deepseek-v3", par, attention="two_stage", dtype="fp8"))
        assert got["experts"] == ("permute", "experts", "unpermute"), par
        assert "ffn_quant" in got["gate" if par.moe_comm != "all_gather" else "dispatch"], par
    fine = stages(layer_graph("deepseek-v3", ParallelConfig(ep=64), attention="fine", dtype="fp8"))
    assert {"q_a_quant", "kv_b_quant", "kv_b", "kv_expand"} <= set(fine["attn0"])
    assert fine["attn1"] == ("core_attn", "o_proj_quant", "o_proj")


def test_every_named_strategy_builds_on_the_fp8_graph():
    """The extra ops change no strategy's ability to schedule a layer: each named strategy builds
    a valid plan for fp8 DeepSeek-V3 at every attention grain, prefill and decode."""
    from overlap.plan import Batch, build_plan, split
    from overlap.plan.strategies import STRATEGIES

    for phase, batch in (("prefill", Batch.prefill(4096, 2)), ("decode", Batch.decode(64, 2048))):
        for grain in ("one", "two_stage", "fine"):
            model = build_model("deepseek-v3", EP16, phase=phase, attention=grain, dtype="fp8",
                                num_layers=4)
            for name in STRATEGIES:
                if name != "auto":
                    build_plan(name, model, split(batch, 2))  # validated as it is built


def test_cast_and_permute_bytes_by_hand():
    """DeepSeek-V3 at EP64, fp8, per local token: a 7168-wide cast reads 2 and writes 1 + 4/128
    bytes per element; permute reads a token once per rank it reaches and writes one FP8 row
    (with scales) per expert; unpermute reads 8 bf16 rows and writes one per rank reached."""
    from overlap.ops_graph.templates.common import ranks_reached

    g = layer_graph("deepseek-v3", ParallelConfig(ep=64), dtype="fp8")
    one = Shape.prefill(1)
    assert g["ffn_quant"].cost(one).hbm_bytes == 7168 * (2 + 1 + 4 / 128) == 21_728
    reached = ranks_reached(load_model("deepseek-v3"), 64)
    assert reached == pytest.approx(7.676, abs=1e-3)  # 64 * (1 - C(252, 8) / C(256, 8))
    row = 7168 * (1 + 4 / 128)
    assert g["permute"].cost(one).hbm_bytes == pytest.approx((reached + 8) * row + 16 * 8)
    assert g["unpermute"].cost(one).hbm_bytes == pytest.approx((reached + 8) * 7168 * 2 + 32)


@given(st.integers(1, 6), st.integers(1, 8), st.integers(1, 4))
def test_ranks_reached_is_the_hypergeometric_expectation(log_ep, per_rank, k):
    """Expected ranks holding one of a token's top-k of E experts, E split evenly over ep ranks:
    ep * (1 - C(E - E/ep, k) / C(E, k)), computed here independently with binomials."""
    from math import comb

    from overlap.ops_graph.templates.common import ranks_reached

    ep = 2 ** log_ep
    experts = ep * per_rank
    k = min(k, experts)
    m = attrs.evolve(load_model("deepseek-v3"), n_routed_experts=experts, num_experts_per_tok=k,
                     n_group=1, topk_group=1)
    expected = ep * (1 - comb(experts - per_rank, k) / comb(experts, k))
    assert ranks_reached(m, ep) == pytest.approx(expected)
