"""The callables of a DeepSeek layer's ops: thin calls into the layer's own vLLM modules.

Nothing here re-implements the model: each op calls the module vLLM's forward would call, in
the same order, on one microbatch's rows, inside that microbatch's forward context. The only
change is where the tensor-parallel all-reduces happen (deferred into their own ops). A split
MoE layer's ops come from ``moe``.
"""

from __future__ import annotations

import types
from typing import Any

from overlap.ops_graph.graph import Graph


def bind_layer(adapter: Any, graph: Graph, layer: Any, *, first: bool,
               moe_ops: dict[str, Any] | None = None) -> Graph:
    """``graph`` bound to ``layer``'s modules; ``first`` marks layer 0 (no residual yet).

    moe_ops: the split MoE ops' callables (``moe.bind_moe``) when ``graph`` has them.
    """
    fns = {"attn": _attn(adapter, layer, first)}
    if moe_ops is not None:
        fns.update(moe_ops)
    else:
        fns["post_norm"] = _post_norm(adapter, layer)
        fns["experts" if "experts" in graph else "mlp"] = _ffn(adapter, layer)
    if "attn_allreduce" in graph:
        fns["attn_allreduce"] = _all_reduce(adapter, "attn_allreduce")
        fns["ffn_allreduce"] = _all_reduce(adapter, "ffn_allreduce")
    return graph.bind(fns)


def _attn(adapter: Any, layer: Any, first: bool) -> Any:
    from vllm.forward_context import override_forward_context

    from overlap.integrations.vllm.metadata import bind_prefill

    norm, attn, o_proj = layer.input_layernorm, layer.self_attn, layer.self_attn.o_proj
    defer = adapter.tp > 1

    def attn_op(hidden: Any, residual: Any) -> tuple[Any, Any]:
        m = adapter.micro()
        step = adapter.step()
        if first:
            residual, x = hidden, norm(hidden)
        else:
            x, residual = norm(hidden, residual)
        for metadata in step.prefill[m]:
            bind_prefill(metadata)
        if defer:
            o_proj.reduce_results = False
        try:
            with override_forward_context(step.contexts[m]):
                out = attn(step.positions[m], x, None)
        finally:
            if defer:
                o_proj.reduce_results = True
        adapter.count("attn")
        return out, residual

    return attn_op


def _post_norm(adapter: Any, layer: Any) -> Any:
    norm = layer.post_attention_layernorm

    def post_norm_op(h: Any, residual: Any) -> tuple[Any, Any]:
        return norm(h, residual)

    return post_norm_op


def _ffn(adapter: Any, layer: Any) -> Any:
    from vllm.forward_context import override_forward_context

    mlp = layer.mlp
    name = "experts" if hasattr(mlp, "experts") else "mlp"
    defer = adapter.tp > 1
    deferred = _defer_moe_reduce(mlp) if defer and name == "experts" else None
    down = getattr(mlp, "down_proj", None)

    def ffn_op(x: Any) -> Any:
        m = adapter.micro()
        if deferred is not None:
            deferred.on = True
        elif defer:
            down.reduce_results = False
        try:
            with override_forward_context(adapter.step().contexts[m]):
                out = mlp(x)
        finally:
            if deferred is not None:
                deferred.on = False
            elif defer:
                down.reduce_results = True
        adapter.count(name)
        return out

    return ffn_op


def _all_reduce(adapter: Any, name: str) -> Any:
    from vllm.distributed import tensor_model_parallel_all_reduce

    def all_reduce_op(x: Any) -> Any:
        out = tensor_model_parallel_all_reduce(x)
        adapter.count(name)
        return out

    return all_reduce_op


class _Deferral:
    on = False


def _defer_moe_reduce(moe: Any) -> _Deferral:
    """Make the MoE runner skip its final tensor-parallel all-reduce while ``.on`` is set.

    Only the final (late) all-reduce of ``MoERunner.forward`` is deferred; the adapter refuses
    layers where the runner reduces earlier (see ``moe_reduce_is_deferrable``).
    """
    runner = moe.experts
    flag = _Deferral()
    original = runner._maybe_reduce_final_output

    def maybe_reduce(self: Any, states: Any, trunc_size: Any, output_is_reduced: Any = None) -> Any:
        if flag.on:
            return states[..., :trunc_size] if trunc_size is not None else states
        return original(states, trunc_size, output_is_reduced)

    runner._maybe_reduce_final_output = types.MethodType(maybe_reduce, runner)
    return flag


def moe_reduce_is_deferrable(moe: Any) -> str:
    """Why the MoE layer's all-reduce cannot be made its own op ("" when it can)."""
    runner = getattr(moe, "experts", None)
    if runner is None or not hasattr(runner, "_maybe_reduce_final_output"):
        return f"MoE layer {type(runner).__name__} has no final all-reduce step to defer"
    cfg = runner.moe_config
    if cfg.is_sequence_parallel or cfg.skip_final_all_reduce:
        return "the MoE runner does not all-reduce its output"
    if runner._fused_output_is_reduced or runner.routed_output_transform is not None:
        return "the MoE kernel reduces its output itself"
    if type(getattr(runner, "router", None)).__name__ == "ZeroExpertRouter":
        return "zero-expert routing adds after the all-reduce"
    return ""
