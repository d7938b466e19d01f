"""A vLLM fused-MoE layer as separate ops, driven through vLLM's modular-kernel seam.

vLLM 0.32's ``MoERunner.forward`` runs, for a modular kernel (``FusedMoEKernel`` whose impl is
``FusedMoEKernelModularImpl``): the router gate, ``router.select_experts``, the kernel's
``prepare`` (``prepare_async`` + hook + receiver where it exists: dispatch), the experts'
``apply`` (through the impl's ``_fused_experts``, which owns vLLM's buffer policy), ``finalize``
(combine), the shared experts, the routed scale, the sum, and the final all-reduce. The ops here
call exactly those pieces, in that order per microbatch, so the split layer computes what the
runner does. With expert parallelism (and no data parallelism: vLLM itself moves nothing then)
dispatch and combine are the adapter's own all-to-alls (``ep``) on vLLM's EP group.

:func:`split_reason` says why a layer keeps the coarse op: a monolithic kernel (routing, dispatch
and combine inside one call), a quantized method, a kernel that reduces its own output, and the
other runner features the split does not reproduce.
"""

from __future__ import annotations

from typing import Any

import attrs

from overlap.integrations.vllm import ep as ep_ops


@attrs.frozen
class Prepared:
    """What dispatch hands to the experts and to combine (one microbatch)."""

    a1q: Any
    a1q_scale: Any
    tokens_meta: Any
    topk_weights: Any
    topk_ids: Any
    dtype: Any


def split_reason(moe: Any, *, ep_size: int, dp_size: int) -> str:
    """Why ``moe`` (a ``DeepseekV2MoE``) cannot run as split ops ("" when it can)."""
    runner = getattr(moe, "experts", None)
    routed = getattr(runner, "routed_experts", None)
    if routed is None or not hasattr(runner, "router"):
        return f"MoE layer {type(runner).__name__} is not vLLM's MoERunner"
    qm = routed.quant_method
    kernel = getattr(qm, "moe_kernel", None)
    if qm.is_monolithic or kernel is None or kernel.is_monolithic:
        return (f"monolithic MoE kernel ({type(qm).__name__}): routing, dispatch and combine run "
                "inside one kernel call")
    if type(qm).__name__ != "UnquantizedFusedMoEMethod":
        return f"quantized MoE method {type(qm).__name__}: the split drives unquantized kernels"
    impl = kernel.impl
    if not all(hasattr(impl, a) for a in ("prepare_finalize", "fused_experts", "_fused_experts")):
        return f"MoE kernel {type(impl).__name__} has no modular prepare/experts/finalize seam"
    if kernel.output_is_reduced():
        return "the MoE kernel reduces its output itself"
    if runner.gate is None or runner._fse_fuse_gate:
        return "the router gate is outside the MoE runner (or fused with a shared-expert gate)"
    if runner.routed_input_transform is not None or runner.routed_output_transform is not None:
        return "latent MoE (routed input/output transforms)"
    if type(runner.router).__name__ == "ZeroExpertRouter":
        return "zero-expert routing"
    if getattr(runner.router, "eplb_state", None) is not None:
        return "expert-parallel load balancing (EPLB) records loads inside the runner"
    if getattr(impl.fused_experts, "_lora_context", None) is not None:
        return "MoE LoRA"
    cfg = runner.moe_config
    if cfg.is_sequence_parallel or cfg.pcp_size > 1 or runner.do_naive_dispatch_combine:
        return "sequence/context-parallel MoE or vLLM's naive data-parallel dispatch"
    if dp_size > 1:
        return "data-parallel expert parallelism (the adapter's all-to-all serves tp x ep only)"
    if ep_size > 1:
        pf = impl.prepare_finalize
        if pf.num_dispatchers() != 1 or impl.fused_experts.quant_config.quant_dtype is not None:
            return (f"expert parallelism with {type(pf).__name__}: the adapter's all-to-all "
                    "replaces only vLLM's no-dispatch path, with unquantized rows")
    return ""


def bind_moe(adapter: Any, layer: Any, *, ep_size: int, ep_rank: int, ep_group: Any) -> dict:
    """The split MoE layer's op callables: gate, dispatch, experts, combine, [shared,] merge."""
    from vllm.forward_context import override_forward_context

    moe = layer.mlp
    runner = moe.experts
    routed = runner.routed_experts
    qm = routed.quant_method
    impl = qm.moe_kernel.impl
    pf, fe = impl.prepare_finalize, impl.fused_experts
    norm = layer.post_attention_layernorm
    shared = getattr(moe, "shared_experts", None)
    owner = local = None
    if ep_size > 1:
        owner, local = ep_ops.owner_table(_expert_maps(runner, ep_size))

    def gate_op(h: Any, res1: Any) -> tuple[Any, Any, Any]:
        x, residual = norm(h, res1)
        routed._ensure_moe_quant_config_init()
        with override_forward_context(adapter.step().contexts[adapter.micro()]):
            logits, _ = runner.gate(x)
            weights, ids = runner.router.select_experts(
                hidden_states=x, router_logits=logits,
                topk_indices_dtype=qm.topk_indices_dtype, input_ids=None)
        adapter.count("gate")
        return x, residual, (weights, ids)

    def dispatch_op(x: Any, topk: Any) -> Any:
        weights, ids = topk
        if ep_size > 1:
            out = ep_ops.dispatch(x, weights, ids, owner, local, rank=ep_rank, size=ep_size,
                                  group=ep_group)
            prepared = _prepare(pf, fe, out.rows, out.weights, out.ids, routed, expert_map=None)
            result: Any = (prepared, out)
        else:
            result = _prepare(pf, fe, x, weights, ids, routed, expert_map=routed.expert_map)
        adapter.count("dispatch")
        return result

    def experts_op(recv: Any) -> Any:
        p = recv[0] if ep_size > 1 else recv
        output = _empty_like(p.a1q, p.dtype)
        n_local = routed.w13_weight.shape[0]
        with override_forward_context(adapter.step().contexts[adapter.micro()]):
            fused = impl._fused_experts(
                in_dtype=p.dtype, a1q=p.a1q, a1q_scale=p.a1q_scale, w1=routed.w13_weight,
                w2=routed.w2_weight, topk_weights=p.topk_weights, topk_ids=p.topk_ids,
                activation=routed.activation,
                # after the adapter's all-to-all the ids are local: no expert map
                global_num_experts=n_local if ep_size > 1 else routed.global_num_experts,
                local_num_experts=n_local,
                expert_map=None if ep_size > 1 else routed.expert_map,
                apply_router_weight_on_input=routed.apply_router_weight_on_input,
                expert_tokens_meta=p.tokens_meta, output_alias=output)
        if ep_size > 1:  # one (expert, weight) per row: weight it here, sum at the source
            _finalize(pf, fe, output, fused, p, routed)
            fused = output
        adapter.count("experts")
        return output, fused

    def combine_op(expert_out: Any, recv: Any) -> Any:
        output, fused = expert_out
        if ep_size > 1:
            out = ep_ops.combine(output, recv[1], group=ep_group)
        else:
            _finalize(pf, fe, output, fused, recv, routed)
            out = output
        adapter.count("combine")
        return out

    def shared_op(x: Any) -> Any:
        out = shared(x)
        adapter.count("shared")
        return out

    def merge_op(routed_out: Any, shared_out: Any = None) -> Any:
        shared_out, routed_out = runner._maybe_apply_routed_scale_to_output(shared_out, routed_out)
        if ep_size > 1:  # this rank's routed rows into the batch; the final all-reduce sums
            base = shared_out.clone() if shared_out is not None else None
            out = base if base is not None else _zeros_rows(routed_out, adapter)
            start, end = ep_ops.chunk(out.shape[0], ep_rank, ep_size)
            out[start:end] += routed_out
        else:
            out = routed_out if shared_out is None else shared_out + routed_out
        adapter.count("merge")
        return out

    fns = {"gate": gate_op, "dispatch": dispatch_op, "experts": experts_op,
           "combine": combine_op, "merge": merge_op}
    if shared is not None:
        fns["shared"] = shared_op
    return fns


def _prepare(pf: Any, fe: Any, x: Any, weights: Any, ids: Any, routed: Any, *,
             expert_map: Any) -> Prepared:
    """The kernel's prepare step (``prepare_async`` + hook + receiver where supported)."""
    args = (x, weights, ids, routed.global_num_experts, expert_map,
            routed.apply_router_weight_on_input, fe.quant_config)
    kwargs = {"defer_input_quant": fe.expects_unquantized_inputs}
    if pf.supports_async():
        ret = pf.prepare_async(*args, **kwargs)
        hook, receiver = ret if isinstance(ret, tuple) else (None, ret)
        if hook is not None:
            hook()
        a1q, scale, meta, got_ids, got_weights = receiver()
    else:
        a1q, scale, meta, got_ids, got_weights = pf.prepare(*args, **kwargs)
    return Prepared(a1q, scale, meta, weights if got_weights is None else got_weights,
                    ids if got_ids is None else got_ids, x.dtype)


def _finalize(pf: Any, fe: Any, output: Any, fused: Any, p: Prepared, routed: Any) -> None:
    """The kernel's finalize step (``finalize_async`` + hook + receiver where supported)."""
    args = (output, fused, p.topk_weights, p.topk_ids, routed.apply_router_weight_on_input,
            fe.finalize_weight_and_reduce_impl())
    if pf.supports_async():
        ret = pf.finalize_async(*args)
        hook, receiver = ret if isinstance(ret, tuple) else (None, ret)
        if hook is not None:
            hook()
        receiver()
    else:
        pf.finalize(*args)


def _expert_maps(runner: Any, ep_size: int) -> list[Any]:
    """Every EP rank's global -> local expert map, as vLLM places experts (no communication)."""
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    strategy = runner.expert_placement_strategy
    maps = [determine_expert_map(ep_size, r, runner.routed_experts.global_num_experts,
                                 strategy)[1] for r in range(ep_size)]
    mine = runner.expert_map
    rank = runner.moe_config.moe_parallel_config.ep_rank
    if mine is None or not bool((maps[rank] == mine.to(maps[rank].dtype)).all()):
        raise ValueError(f"rank {rank}'s expert map {mine} is not vLLM's {strategy!r} placement")
    return maps


def _empty_like(x: Any, dtype: Any) -> Any:
    import torch

    return torch.empty(x.shape, dtype=dtype, device=x.device)


def _zeros_rows(rows: Any, adapter: Any) -> Any:
    import torch

    n = adapter.step().positions[adapter.micro()].shape[0]
    return torch.zeros((n, rows.shape[1]), dtype=rows.dtype, device=rows.device)
