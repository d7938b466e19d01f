"""Running a vLLM ``DeepseekV2Model``'s decoder layers as a Plan, one step at a time.

:class:`DeepseekOverlap` is attached to each model when the plugin is configured. Per step it
splits the batch at request boundaries (the split agreed across data-parallel ranks), rebuilds
the attention metadata per microbatch, and hands every decoder layer to the :class:`Executor` as
a bound ops graph (see ``graph``): one plan spans all layers, so a strategy may overlap one
layer's tail with the next layer's head. Whatever it cannot run exactly — a configuration it
does not support, torch.compile tracing, CUDA graphs, a batch too small to split — runs the stock
forward instead, and the reason is logged once.

The tensor-parallel all-reduces become communication ops by *deferring* them: o_proj and the
dense MLP's down_proj run with ``reduce_results`` off, and the MoE runner's final all-reduce is
skipped (its instance's ``_maybe_reduce_final_output`` is wrapped), only while our op runs.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs

from overlap.backends.executor import BackendUnavailableError, Executor
from overlap.integrations.vllm import metadata as md_utils
from overlap.integrations.vllm.config import OverlapConfig
from overlap.integrations.vllm.graph import INPUTS, layer_graph
from overlap.ops_graph.graph import Graph, ModelGraph
from overlap.plan.batch import Batch
from overlap.plan.plan import Plan
from overlap.plan.split import Split, agree, split, split_agreed, whole
from overlap.plan.strategies import build_plan

log = logging.getLogger("vllm.overlap")  # under vLLM's logger, so its handlers show it
MAX_CACHED_EXECUTORS = 8  # distinct microbatch token counts kept ready


@attrs.define
class _Step:
    """What the bound ops of one step read besides their data: per-microbatch state."""

    contexts: list[Any]
    positions: list[Any]
    prefill: list[list[Any]]  # per microbatch: metadata objects whose prefill to re-bind


class DeepseekOverlap:
    """Executes one DeepseekV2Model's decoder layers under a plan (or says why it does not)."""

    def __init__(self, model: Any, config: OverlapConfig, vllm_config: Any) -> None:
        from vllm.distributed import get_tensor_model_parallel_world_size
        from vllm.platforms import current_platform

        self.model = model
        self.config = config
        self.backend_name = config.backend_for(current_platform.device_type)
        self.tp = get_tensor_model_parallel_world_size()
        self.dp = vllm_config.parallel_config.data_parallel_size
        self.enabled = True
        self.stats: Counter[str] = Counter()
        self.unsupported = _unsupported(model, vllm_config)
        self._logged: set[str] = set()
        self._local = threading.local()
        self._step: _Step | None = None
        self._host_thread = threading.get_ident()
        self._context = self._scope  # one object, so executors reuse their compiled closures
        self._layers: tuple[Graph, ...] | None = None
        self._model_graph: ModelGraph | None = None
        self._templates: dict[int, Plan] = {}
        self._executors: dict[tuple[int, ...], Executor] = {}

    # -- control ------------------------------------------------------------------------------------

    @property
    def layer_count(self) -> int:
        """Decoder layers bound to the plan so far (0 before the first planned step)."""
        return len(self._layers or ())

    def set_backend(self, name: str) -> None:
        """Run later steps on backend ``name`` (closes the executors built so far)."""
        for executor in self._executors.values():
            executor.close()
        self._executors.clear()
        self.backend_name = name

    # -- one step ---------------------------------------------------------------------------------

    def forward(self, stock: Any, input_ids: Any, positions: Any, intermediate_tensors: Any,
                inputs_embeds: Any = None) -> Any:
        """The model's forward: the plan when it can run exactly, else ``stock``."""
        args = (input_ids, positions, intermediate_tensors, inputs_embeds)
        if not self.enabled:
            return stock(*args)
        reason = self.unsupported or _unsupported_now(self.model)
        if reason:
            return self._fallback("config", reason, stock, args)
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return self._fallback("context", "no forward context", stock, args)
        ctx = get_forward_context()
        if ctx.cudagraph_runtime_mode.name != "NONE":
            return self._fallback("cudagraph", "CUDA-graph capture/replay is not planned", stock, args)
        planned, reason, pendings = self._decide(ctx, positions)
        if planned is None:
            return self._fallback("batch", reason, stock, args)
        executor = self._executor(planned)
        if executor is None:
            return self._fallback("config", self.unsupported, stock, args)
        return self._run(ctx, planned, executor, pendings, input_ids, positions, inputs_embeds)

    def _decide(self, ctx: Any, positions: Any) -> tuple[Split | None, str, dict[int, Any]]:
        """This step's split, agreed across data-parallel ranks, or None and why not."""
        batch, reason, pendings = self._local_batch(ctx, positions)
        planned, why = decide_split(batch, self.config, self.dp, self._all_reduce_min)
        return planned, why or reason, pendings

    def _local_batch(self, ctx: Any, positions: Any) -> tuple[Batch | None, str, dict[int, Any]]:
        amd = ctx.attn_metadata
        if not isinstance(amd, dict) or not amd:
            return None, "no attention metadata (profile or dummy run)", {}
        pendings = {id(m): getattr(m, md_utils.PENDING_ATTR, None) for m in amd.values()}
        if any(p is None for p in pendings.values()):
            kinds = sorted({type(m).__name__ for m in amd.values()})
            return None, f"attention metadata {kinds} was not built by a hooked MLA builder", {}
        common = next(iter(pendings.values())).common
        if positions.shape[0] != common.num_actual_tokens:
            return None, f"padded batch ({positions.shape[0]} rows for {common.num_actual_tokens} tokens)", {}
        batch = md_utils.batch_of(common)
        if batch is None:
            return None, "a request has no new token", {}
        return batch, "", pendings

    def _run(self, ctx: Any, planned: Split, executor: Executor, pendings: dict[int, Any],
             input_ids: Any, positions: Any, inputs_embeds: Any) -> Any:
        model = self.model
        if planned.n == 1:
            contexts, prefill = [ctx], [[]]
        else:
            subs = {key: md_utils.build_microbatch_metadata(p, planned) for key, p in pendings.items()}
            dp_md = self._dp_metadata(ctx, planned) if ctx.dp_metadata is not None else None
            contexts = md_utils.microbatch_contexts(ctx, planned, subs, dp_md)
            prefill = [[s[m] for s in subs.values() if getattr(s[m], "prefill", None) is not None]
                       for m in range(planned.n)]
        bounds = [(m.token_start, m.token_end) for m in planned.micro]
        self._step = _Step(contexts, [positions[a:b] for a, b in bounds], prefill)
        self._host_thread = threading.get_ident()
        hidden = inputs_embeds if inputs_embeds is not None else model.embed_input_ids(input_ids)
        try:
            out = executor.run({INPUTS[0]: hidden, INPUTS[1]: hidden}, layers=self._layers,
                               context=self._context)
        finally:
            self._step = None
            if planned.n > 1:
                for whole_step in {id(m): m for m in ctx.attn_metadata.values()}.values():
                    md_utils.bind_prefill(whole_step)  # for whoever reads it after the model
                ctx.moe_layer_index = max(c.moe_layer_index for c in contexts)
        self.stats["steps_planned"] += 1
        self.stats[f"steps_{planned.n}_microbatches"] += 1
        hidden, _ = model.norm(out["hidden_out"], out["residual_out"])
        return hidden

    # -- plans and executors ----------------------------------------------------------------------

    def _executor(self, planned: Split) -> Executor | None:
        key = planned.token_counts
        executor = self._executors.get(key)
        if executor is not None:
            return executor
        if self._layers is None:
            self.unsupported = self._bind_layers()
            if self.unsupported:
                return None
        template = self._templates.get(planned.n)
        if template is None:
            template = build_plan(self.config.strategy, self._model_graph, planned)
            self._templates[planned.n] = template
        plan = template if template.split == planned else attrs.evolve(template, split=planned)
        if len(self._executors) >= MAX_CACHED_EXECUTORS:
            for old in self._executors.values():
                old.close()
            self._executors.clear()
        try:  # each executor owns its backend (its streams), closed when evicted
            executor = Executor(plan, self.backend_name)
        except BackendUnavailableError as exc:
            self.unsupported = f"backend {self.backend_name!r} is unavailable here: {exc}"
            return None
        self._executors[key] = executor
        return executor

    def _bind_layers(self) -> str:
        """Bind every decoder layer's graph; returns why it cannot ("" when it can)."""
        from overlap.integrations.vllm.ops import bind_layer, moe_reduce_is_deferrable

        layers = list(self.model.layers[self.model.start_layer:self.model.end_layer])
        if self.tp > 1:
            for layer in layers:
                reason = "" if _is_dense(layer) else moe_reduce_is_deferrable(layer.mlp)
                if reason:
                    return reason
        shared: dict[bool, Graph] = {}
        bound = []
        for i, layer in enumerate(layers):
            moe = not _is_dense(layer)
            graph = shared.setdefault(moe, layer_graph(moe=moe, tp=self.tp))
            bound.append(bind_layer(self, graph, layer, first=i == 0))
        self._layers = tuple(bound)
        self._model_graph = ModelGraph("deepseek", [shared[not _is_dense(la)] for la in layers])
        return ""

    # -- what the bound ops use -------------------------------------------------------------------

    def _scope(self, micro: int) -> Any:
        """The executor's ``context(m)``: tells the ops (on whatever thread) their microbatch.

        Off the host thread it also enters inference mode, which torch keeps per thread.
        """
        return _Micro(self._local, micro, self._host_thread)

    def micro(self) -> int:
        """The microbatch of the op running on this thread."""
        return self._local.micro

    def step(self) -> _Step:
        assert self._step is not None, "an op ran outside a planned step"
        return self._step

    def count(self, op: str) -> None:
        self.stats[f"op_{op}_mb{self._local.micro}"] += 1

    # -- data parallel ------------------------------------------------------------------------------

    def _all_reduce_min(self, n: int) -> int:
        import torch
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_dp_group

        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=get_dp_group().cpu_group)
        return int(t.item())

    def _dp_metadata(self, ctx: Any, planned: Split) -> list[Any]:
        """Per-microbatch DP metadata: every rank's token count of each microbatch."""
        import torch
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_dp_group
        from vllm.forward_context import DPMetadata

        mine = torch.tensor(planned.token_counts, dtype=torch.int64)
        parts = [torch.empty_like(mine) for _ in range(self.dp)]
        dist.all_gather(parts, mine, group=get_dp_group().cpu_group)
        table = torch.stack(parts).to(ctx.dp_metadata.num_tokens_across_dp_cpu.dtype)
        return [DPMetadata(table[:, m].contiguous()) for m in range(planned.n)]

    # -- falling back ------------------------------------------------------------------------------

    def _fallback(self, key: str, reason: str, stock: Any, args: tuple) -> Any:
        self.stats[f"fallback_{key}"] += 1
        kind = re.sub(r"\d+", "N", reason)  # once per kind of reason, whatever the sizes
        if kind not in self._logged:
            self._logged.add(kind)
            log.info("overlap: stock forward (%s); further steps for this reason are not logged",
                     reason)
        return stock(*args)


def decide_split(batch: Batch | None, config: OverlapConfig, dp: int,
                 all_reduce_min: Callable[[int], int]) -> tuple[Split | None, str]:
    """The step's split, or None and why not (``batch`` None: this rank cannot split).

    With ``dp`` > 1 ranks and more than one microbatch every rank votes through
    ``all_reduce_min`` — also a rank that cannot split, so the vote never hangs — and either all
    ranks split into the same count or none does.
    """
    n = config.microbatches
    agreeing = dp > 1 and n > 1  # one microbatch issues the stock collectives: nothing to agree
    if batch is None:
        if agreeing:
            agree(1, all_reduce_min)
        return None, ""
    options = {"min_tokens": config.min_tokens, "max_imbalance": config.max_imbalance}
    if n == 1:
        planned = whole(batch)
    elif agreeing:
        planned = split_agreed(batch, n, all_reduce_min, **options)
    else:
        planned = split(batch, n, **options)
    if planned.n != n:
        return None, planned.reason or "data-parallel ranks agreed not to split"
    return planned, ""


class _Micro:
    """Sets the running thread's microbatch for the duration of one op call."""

    __slots__ = ("local", "micro", "host", "mode")

    def __init__(self, local: threading.local, micro: int, host: int) -> None:
        self.local, self.micro, self.host, self.mode = local, micro, host, None

    def __enter__(self) -> None:
        self.local.micro = self.micro
        if threading.get_ident() != self.host:
            import torch

            self.mode = torch.inference_mode()
            self.mode.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.mode is not None:
            mode, self.mode = self.mode, None
            mode.__exit__(*exc)


def _is_dense(layer: Any) -> bool:
    return type(layer.mlp).__name__ == "DeepseekV2MLP"


def _unsupported(model: Any, vllm_config: Any) -> str:
    """Why this model/configuration cannot be planned at all ("" when it can)."""
    import torch

    par = vllm_config.parallel_config
    if par.pipeline_parallel_size > 1:
        return "pipeline parallelism is not supported"
    if vllm_config.speculative_config is not None:
        return "speculative decoding is not supported"
    if getattr(model, "is_v32", False):
        return "DeepSeek V3.2 sparse attention is not supported"
    if getattr(model.config, "llama_4_scaling", None) is not None:
        return "llama-4 attention scaling is not supported"
    if vllm_config.model_config.dtype == torch.float16:
        return "float16 (DeepSeek's fp16 overflow rescaling) is not supported"
    for layer in model.layers[model.start_layer:model.end_layer]:
        if layer.use_mha or layer.use_sequence_parallel_moe:
            return "MHA attention or sequence-parallel MoE layers are not supported"
        if not hasattr(layer.self_attn, "o_proj"):
            return f"attention {type(layer.self_attn).__name__} has no o_proj"
    return ""


def _unsupported_now(model: Any) -> str:
    """Why this call cannot be planned, for conditions that appear after construction."""
    import torch

    if torch.compiler.is_compiling():
        return "traced by torch.compile (the compiled graph keeps the stock forward)"
    if model.aux_hidden_state_layers:
        return "auxiliary hidden states (EAGLE-3 drafting) are not supported"
    return ""
