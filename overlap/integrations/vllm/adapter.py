"""Running a vLLM ``DeepseekV2Model``'s decoder layers as a Plan, one step at a time.

:class:`DeepseekOverlap` is attached to each model when the plugin is configured. Per step it
splits the batch at request boundaries, or through a request when that split is refused (the
split agreed across data-parallel ranks; see ``decide_split``), rebuilds the attention metadata
per microbatch, and hands every decoder layer to the :class:`Executor` as a bound ops graph
(see ``graph``): one plan spans all layers, so a strategy may overlap one layer's tail with the
next layer's head. Whatever it cannot run exactly — a configuration it
does not support, torch.compile tracing, CUDA graphs, a batch too small to split — runs the stock
forward instead, and the reason is logged once.

The tensor-parallel all-reduces become communication ops by *deferring* them: o_proj and the
dense MLP's down_proj run with ``reduce_results`` off, and the MoE runner's final all-reduce is
skipped (its instance's ``_maybe_reduce_final_output`` is wrapped), only while our op runs.

Per step the host work is kept small: plans and executors are cached by a *shape bucket* (the
microbatch count and each microbatch's token count rounded up to a power of two), not by exact
token counts, so a serving loop builds them once per bucket; the executor's plan keeps the split
it was built for and the step's real rows reach it through ``take``. The plugin never kills the
engine: a step whose metadata cannot be split, or whose plan raises, runs the stock forward.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import attrs

from overlap.backends.executor import BackendUnavailableError, Executor
from overlap.integrations.vllm import metadata as md_utils
from overlap.integrations.vllm.config import OverlapConfig
from overlap.integrations.vllm.graph import INPUTS, layer_graph
from overlap.integrations.vllm.timing import HostTimer, TimedScope
from overlap.ops_graph.graph import Graph, ModelGraph
from overlap.ops_graph.op import OpKind
from overlap.plan.batch import Batch
from overlap.plan.deps import unordered_kv_reads
from overlap.plan.plan import Plan
from overlap.plan.split import Split, agree, split, whole
from overlap.plan.strategies import build_plan

log = logging.getLogger("vllm.overlap")  # under vLLM's logger, so its handlers show it
MAX_CACHED_EXECUTORS = 8  # shape buckets kept ready (least recently used evicted)
MIN_BUCKET = 16  # microbatches up to this many tokens share one bucket
MAX_CACHED_SPLITS = 256  # distinct query-length tuples whose split is kept
CONCURRENT_HOST_BACKENDS = ("threads",)  # each plan stream a host thread: see concurrent_compute


def shape_bucket(planned: Split) -> tuple:
    """The cache key of a split: its microbatch count, then each microbatch's token count
    rounded up to a power of two (at least :data:`MIN_BUCKET`); when a microbatch continues a
    request the previous one cut, also which do (the plan orders their attention)."""
    key = (planned.n, *(max(MIN_BUCKET, 1 << (c - 1).bit_length()) for c in planned.token_counts))
    flags = cut_flags(planned)
    return (*key, flags) if any(flags) else key


def concurrent_compute(plan: Plan) -> str:
    """Why ``plan`` cannot run where each stream is a host thread ("" when it can).

    The bound ops of one layer share state that is not per thread: vLLM's forward context is
    one module global (``override_forward_context``), and the deferred all-reduces and the MLA
    prefill binding are attributes of the layer's modules. Compute ops on one stream run one at
    a time, so any number of comm streams is fine; compute ops on two streams could run at once.
    """
    layers = plan.model.layers
    streams = sorted({s.stream for s in plan.steps
                      if layers[s.layer][s.op].kind is OpKind.COMPUTE})
    if len(streams) <= 1:
        return ""
    names = ", ".join(plan.streams[i].name for i in streams)
    return (f"the {plan.strategy} plan runs compute ops on {len(streams)} streams ({names}); "
            "they would run at once, and the ops share per-layer state that is not per thread "
            "(vLLM's forward context is one module global): use a plan with one compute stream "
            "or the 'inline' backend")


def cut_flags(planned: Split) -> tuple[bool, ...]:
    """Per microbatch: whether it continues a request that the previous microbatch cut."""
    return tuple(m.continues_request for m in planned.micro)


@attrs.define
class _Step:
    """What the bound ops of one step read besides their data: per-microbatch state."""

    contexts: list[Any]
    positions: list[Any]
    prefill: list[list[Any]]  # per microbatch: metadata objects whose prefill to re-bind


class DeepseekOverlap:
    """Executes one DeepseekV2Model's decoder layers under a plan (or says why it does not)."""

    def __init__(self, model: Any, config: OverlapConfig, vllm_config: Any) -> None:
        import vllm.forward_context
        from vllm.distributed import get_tensor_model_parallel_world_size
        from vllm.platforms import current_platform

        self.model = model
        self._fc = vllm.forward_context  # read every step: looked up once, not imported per call
        self.config = config
        self.vllm_config = vllm_config
        self.auto: Any = None  # strategy auto: its AutoPlanner (integrations.vllm.auto)
        self.decision: Any = None  # ... and this step's decision
        self.backend_name = config.backend_for(current_platform.device_type)
        self.tp = get_tensor_model_parallel_world_size()
        self.ep = _ep_group(vllm_config)
        if self.ep[0] > 1 and current_platform.device_type == "cpu":
            from overlap.integrations.vllm.ep import fix_cpu_expert_map

            fix_cpu_expert_map()  # else the stock forward (fallbacks, plugin off) is wrong
        self.moe_forms: tuple[str, ...] = ()  # per bound decoder layer: dense | split | coarse
        self.record = False  # time every op span (control(record=True)); see spans.py
        self._trace = config.trace  # written once, by the first planned step
        self.dp = vllm_config.parallel_config.data_parallel_size
        self.enabled = True
        self.cut_off = ""  # why requests are no longer cut ("" while they may be)
        self._kv_checked: dict[tuple, str] = {}  # shape bucket of a cut split -> why not
        self.stats: Counter[str] = Counter()
        self.unsupported = _unsupported(model, vllm_config)
        self.host = HostTimer()  # per planned step: the adapter's own host time, by section
        self.timer: HostTimer | None = None  # ``host`` while timing (``control``), else None
        self._builders = md_utils.BuilderPool()
        self._views = md_utils.StepViews()  # microbatch slices of the step's buffers, reused
        self._splits: dict[tuple[int, ...], tuple[Split | None, str]] = {}
        self._logged: set[str] = set()
        self._local = threading.local()
        self._step: _Step | None = None
        self._host_thread = threading.get_ident()
        # The executor's ``context``: one object each, so executors reuse their compiled
        # closures. On a backend that runs every op on the calling thread (``immediate``) the
        # scope is a list lookup; on others ``_scope`` also checks the thread.
        self._scope_sets: dict[bool, list[Any]] = {False: [], True: []}  # untimed, timed
        self._host_scopes: list[Any] = []  # the running step's set, filled in place
        self._host_timed: bool | None = None  # which set it holds
        self._host_context = self._host_scopes.__getitem__
        self._count_keys: dict[tuple[str, int], str] = {}
        self._layers: tuple[Graph, ...] | None = None
        self._model_graph: ModelGraph | None = None
        self._templates: dict[Any, Plan] = {}  # by shape bucket (and, for auto, the choice)
        self._executors: OrderedDict[tuple[tuple[int, ...], bool], Executor] = OrderedDict()
        self._bucket: tuple[Split | None, tuple[int, ...]] = (None, ())  # the last split's

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
        timer = self.timer
        if timer is not None:
            timer.start()
        reason = self.unsupported or _unsupported_now(self.model)
        if reason:
            return self._fallback("config", reason, stock, args)
        if not self._fc.is_forward_context_available():
            return self._fallback("context", "no forward context", stock, args)
        ctx = self._fc.get_forward_context()
        if ctx.cudagraph_runtime_mode.name != "NONE":
            return self._fallback("cudagraph", "CUDA-graph capture/replay is not planned", stock, args)
        planned, reason, pendings = self._decide(ctx, positions)
        if planned is None:
            return self._fallback("batch", reason, stock, args)
        executor = self._executor(planned)
        if executor is None:
            return self._fallback("config", self.unsupported, stock, args)
        if timer is not None:
            timer.lap("decide")
        try:
            contexts, prefill = self._contexts(ctx, planned, pendings)
        except md_utils.SplitError as exc:  # this step only: the next may split
            return self._fallback("metadata", str(exc), stock, args)
        try:
            hidden = self._run(ctx, planned, executor, contexts, prefill, input_ids, positions,
                               inputs_embeds)
        except Exception as exc:  # noqa: BLE001 - the engine must outlive a plugin failure
            # Re-running the step stock is exact: it rewrites the same KV-cache slots. A plan
            # that failed once will fail again, so later steps run stock without trying.
            self.unsupported = f"the planned forward raised {type(exc).__name__}: {exc}"
            log.warning("overlap: %s; this and later steps run the stock forward",
                        self.unsupported, exc_info=True)
            return self._fallback("error", self.unsupported, stock, args)
        if timer is not None:
            timer.lap("finish")
            timer.done()
        return hidden

    def _decide(self, ctx: Any, positions: Any) -> tuple[Split | None, str, dict[int, Any]]:
        """This step's split, agreed across data-parallel ranks, or None and why not.

        Without data parallelism the split is cached by the requests' query lengths: it
        balances tokens, so steps with the same query lengths (every decode step of the same
        requests) split the same way. The cached Split keeps the context lengths of the step
        that made it; the adapter reads only its request and token ranges.
        """
        common, reason, pendings = self._step_common(ctx, positions)
        if self.config.strategy in ("auto", "off"):  # decided per step: integrations.vllm.auto
            from overlap.integrations.vllm.auto import plan_step

            batch = md_utils.batch_of(common) if common is not None else None
            if common is not None and batch is None:
                reason = "a request has no new token"
            planned, why = plan_step(self, batch)
            return planned, why or reason, pendings
        if common is not None and not (self.dp > 1 and self.config.microbatches > 1):
            key = tuple(common.query_start_loc_cpu.tolist()[: common.num_reqs + 1])
            hit = self._splits.get(key)
            if hit is None:
                batch = md_utils.batch_of(common)
                hit = (decide_split(batch, self.config, self.dp, self._all_reduce_min,
                                    cut=self._cut_check)
                       if batch is not None else (None, "a request has no new token"))
                if len(self._splits) >= MAX_CACHED_SPLITS:
                    self._splits.clear()
                self._splits[key] = hit
            return hit[0], hit[1], pendings
        batch = md_utils.batch_of(common) if common is not None else None
        if common is not None and batch is None:
            reason = "a request has no new token"
        planned, why = decide_split(batch, self.config, self.dp, self._all_reduce_min,
                                    cut=self._cut_check)
        return planned, why or reason, pendings

    def _cut_check(self, planned: Split) -> str:
        """Why ``planned``, which cuts a request, cannot run ("" when it can): cutting is off,
        or the plan of its shape bucket does not order the continuing microbatch's attention
        after the KV-cache write it reads (checked once per bucket)."""
        if self.cut_off:
            return self.cut_off
        key = shape_bucket(planned)
        why = self._kv_checked.get(key)
        if why is None:
            plan = self._template(key, planned)  # the one _executor will run for this bucket
            if plan is None:
                return self.unsupported
            gaps = unordered_kv_reads(plan, cut_flags(planned))
            why = self._kv_checked[key] = (
                f"the {plan.strategy} plan does not order a cut request's KV cache: {gaps[0]}"
                if gaps else "")
            if why:
                self._stop_cutting(why)
        return why

    def _stop_cutting(self, reason: str) -> None:
        """Cut at request boundaries only from now on; the reason is logged once."""
        self.cut_off = reason
        self._splits.clear()  # cached splits may cut requests
        self.stats["cut_stopped"] += 1
        log.info("overlap: requests are no longer cut, steps split at request boundaries "
                 "only (%s)", reason)

    def _step_common(self, ctx: Any, positions: Any) -> tuple[Any, str, dict[int, Any]]:
        """The step's CommonAttentionMetadata and pending builds, or None and why not."""
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
        return common, "", pendings

    def _contexts(self, ctx: Any, planned: Split, pendings: dict[int, Any]
                  ) -> tuple[list[Any], list[list[Any]]]:
        """Per-microbatch forward contexts and prefill metadata; :class:`SplitError` if not."""
        if planned.n == 1:
            return [ctx], [[]]
        subs, failed = {}, None
        try:
            for key, pending in pendings.items():
                builders = self._builders.get(pending.builder, planned.n)
                subs[key] = md_utils.build_microbatch_metadata(pending, planned, builders,
                                                                self._views)
        except md_utils.CutError as exc:
            self._stop_cutting(str(exc))
            failed = exc
        except md_utils.SplitError as exc:
            failed = exc
        # Data-parallel ranks run the step's collectives (the DP metadata below, the MoE's per
        # microbatch) together: all plan it, or all run it stock, else they would hang.
        agreed = self.dp <= 1 or self._all_reduce_min(0 if failed is not None else 1)
        if not agreed and failed is None:
            failed = md_utils.SplitError("another data-parallel rank could not build its "
                                         "microbatch metadata (every rank runs this step stock)")
        if failed is not None:
            raise failed
        timer = self.timer
        if timer is not None:
            timer.lap("metadata")
        dp_md = self._dp_metadata(ctx, planned) if ctx.dp_metadata is not None else None
        contexts = md_utils.microbatch_contexts(ctx, planned, subs, dp_md, self._views)
        prefill = [[s[m] for s in subs.values() if getattr(s[m], "prefill", None) is not None]
                   for m in range(planned.n)]
        if timer is not None:
            timer.lap("contexts")
        return contexts, prefill

    def _run(self, ctx: Any, planned: Split, executor: Executor, contexts: list[Any],
             prefill: list[list[Any]], input_ids: Any, positions: Any, inputs_embeds: Any) -> Any:
        model, timer = self.model, self.timer
        bounds = [(m.token_start, m.token_end) for m in planned.micro]
        self._step = _Step(contexts, self._views.get(
            planned, "positions", (positions,), lambda: [positions[a:b] for a, b in bounds]),
            prefill)
        self._host_thread = threading.get_ident()
        timed = timer is not None
        if self._host_timed is not timed or len(self._host_scopes) < planned.n:
            self._host_scopes[:] = self._scopes(planned.n, timed)
            self._host_timed = timed
        # The executor's plan keeps the split it was built for (its bucket's first); map each
        # of its microbatch row ranges to this step's.
        rows = {(m.token_start, m.token_end): bound
                for m, bound in zip(executor.plan.split.micro, bounds)}

        def take(value: Any, start: int, end: int) -> Any:
            if value is None:
                return None
            a, b = rows[(start, end)]
            return value[a:b]

        clock = timer.op_clock() if timer is not None else None
        hidden = inputs_embeds if inputs_embeds is not None else model.embed_input_ids(input_ids)
        if clock is not None:  # the embedding and final norm are the stock forward's work too
            timer.op_done(clock)
        try:  # no residual before layer 0, as in the stock forward (its attn op ignores it)
            out = executor.run({INPUTS[0]: hidden, INPUTS[1]: None}, layers=self._layers,
                               take=take, context=self._host_context
                               if getattr(executor.backend, "immediate", False) else self._scope)
            if executor.timeline is not None:
                self._recorded(executor.timeline)
        finally:
            self._step = None
            if planned.n > 1:
                for whole_step in {id(m): m for m in ctx.attn_metadata.values()}.values():
                    md_utils.bind_prefill(whole_step)  # for whoever reads it after the model
                ctx.moe_layer_index = max(c.moe_layer_index for c in contexts)
        self.stats["steps_planned"] += 1
        self.stats[f"steps_{planned.n}_microbatches"] += 1
        if any(cut_flags(planned)):  # a microbatch continued a request the previous one cut
            self.stats["steps_cut_request"] += 1
        if timer is not None:
            timer.lap("dispatch")
            clock = timer.op_clock()
        hidden, _ = model.norm(out["hidden_out"], out["residual_out"])
        if clock is not None:
            timer.op_done(clock)
        return hidden

    # -- plans and executors ----------------------------------------------------------------------

    def _recorded(self, timeline: Any) -> None:
        from overlap.integrations.vllm.spans import comm_overlap, trace_path

        comm, hidden = comm_overlap(timeline)
        self.stats["recorded_steps"] += 1
        self.stats["comm_s"] += comm
        self.stats["comm_overlapped_s"] += hidden
        self.stats["step_s"] += timeline.makespan
        if self._trace:
            import torch.distributed as dist

            from overlap.report.trace import write_trace

            on = dist.is_available() and dist.is_initialized()
            path = trace_path(self._trace, dist.get_rank() if on else 0,
                              dist.get_world_size() if on else 1)
            self._trace = None
            write_trace(timeline, path)  # atomically
            log.info("overlap: wrote the Perfetto trace of one planned step to %s", path)

    def _executor(self, planned: Split) -> Executor | None:
        """The cached executor of ``planned``'s shape bucket (built on its first step)."""
        if self._bucket[0] is not planned:  # cached splits recur: so does their (pure) bucket
            self._bucket = (planned, shape_bucket(planned))
        key = (self._bucket[1], self.record or bool(self._trace))
        auto = self.config.strategy == "auto"
        if auto:  # one executor per decided choice and bucket
            key = (*key, self.decision.choice)
        executor = self._executors.get(key)
        if executor is not None:
            self._executors.move_to_end(key)
            return executor
        # Recording needs no other plan: the template key leaves it out.
        plan = self._template((key[0], key[2]) if auto else key[0], planned)
        if plan is None:
            return None
        if self.backend_name in CONCURRENT_HOST_BACKENDS:
            why = concurrent_compute(plan)
            if why:
                self.unsupported = f"on the {self.backend_name!r} backend, {why}"
                return None
        if len(self._executors) >= MAX_CACHED_EXECUTORS:
            _, old = self._executors.popitem(last=False)
            old.close()
        try:  # each executor owns its backend (its streams), closed when evicted
            executor = Executor(plan, self.backend_name, record=key[1])
        except BackendUnavailableError as exc:
            self.unsupported = f"backend {self.backend_name!r} is unavailable here: {exc}"
            return None
        self._executors[key] = executor
        self.stats["executors_built"] += 1
        return executor

    def _template(self, key: Any, planned: Split) -> Plan | None:
        """The plan of bucket ``key`` (built from ``planned`` on first use, shared by the
        bucket's executors), or None when the layers cannot be bound (``unsupported`` says why)."""
        if self._layers is None:
            self.unsupported = self._bind_layers()
            if self.unsupported:
                return None
        plan = self._templates.get(key)
        if plan is None:
            plan = (self.auto.plan(self.decision, planned) if self.config.strategy == "auto"
                    else build_plan(self.config.strategy, self._model_graph, planned))
            self._templates[key] = plan
        return plan

    def _bind_layers(self) -> str:
        """Bind every decoder layer's graph; returns why it cannot ("" when it can)."""
        from overlap.integrations.vllm.ops import bind_layer, moe_reduce_is_deferrable

        layers = list(self.model.layers[self.model.start_layer:self.model.end_layer])
        forms = [self._moe_form(layer) for layer in layers]
        self.moe_forms = tuple(forms)
        if self.tp > 1:
            for layer, form in zip(layers, forms):
                reason = moe_reduce_is_deferrable(layer.mlp) if form == "coarse" else ""
                if reason:
                    return reason
        shared: dict[tuple[str, bool], Graph] = {}
        graphs, bound = [], []
        for i, (layer, form) in enumerate(zip(layers, forms)):
            has_shared = getattr(layer.mlp, "shared_experts", None) is not None
            ep = self.ep[0] if form == "split" else 1
            graph = shared.setdefault((form, has_shared), layer_graph(
                moe=form, tp=self.tp, ep=ep, shared=has_shared))
            ops = self._moe_ops(layer) if form == "split" else None
            graphs.append(graph)
            bound.append(bind_layer(self, graph, layer, first=i == 0, moe_ops=ops))
        self._layers = tuple(bound)
        self._model_graph = ModelGraph("deepseek", graphs)
        return ""

    def _moe_form(self, layer: Any) -> str:
        """``dense``, ``split`` or ``coarse`` (the reason logged once) for one decoder layer."""
        from overlap.integrations.vllm.moe import split_reason

        if _is_dense(layer):
            return "dense"
        if self.config.moe == "coarse":
            return "coarse"
        reason = split_reason(layer.mlp, ep_size=self.ep[0], dp_size=self.dp)
        if reason:
            if reason not in self._logged:
                self._logged.add(reason)
                log.info("overlap: MoE layers keep one coarse 'experts' op (%s)", reason)
            return "coarse"
        return "split"

    def _moe_ops(self, layer: Any) -> dict[str, Any]:
        from overlap.integrations.vllm.moe import bind_moe

        size, rank, group = self.ep
        return bind_moe(self, layer, ep_size=size, ep_rank=rank, ep_group=group)

    # -- what the bound ops use -------------------------------------------------------------------

    def _scope(self, micro: int) -> Any:
        """The executor's ``context(m)``: tells the ops (on whatever thread) their microbatch.

        On the host thread ops run one at a time, so one reusable scope per microbatch serves
        (it is entered for every op call: a new object each time costs measurable host time);
        ``_run`` picks the step's set, timed or not. Off the host thread it also enters
        inference mode, which torch keeps per thread.
        """
        if threading.get_ident() == self._host_thread:
            return self._host_scopes[micro]
        return _Micro(self, micro)

    def _scopes(self, n: int, timed: bool) -> list[Any]:
        """At least ``n`` reusable host-thread scopes, timing the op calls or not."""
        scopes = self._scope_sets[timed]
        while len(scopes) < n:
            m = len(scopes)
            scopes.append(TimedScope(self._local, m, self.host) if timed
                          else _HostScope(self._local, m))
        return scopes

    def micro(self) -> int:
        """The microbatch of the op running on this thread."""
        return self._local.micro

    def step(self) -> _Step:
        assert self._step is not None, "an op ran outside a planned step"
        return self._step

    def count(self, op: str) -> None:
        """Count one call of ``op`` for the running microbatch (``stats``'s ``op_<op>_mb<m>``)."""
        key = (op, self._local.micro)
        name = self._count_keys.get(key)
        if name is None:
            name = self._count_keys[key] = f"op_{op}_mb{key[1]}"
        self.stats[name] += 1

    # -- data parallel ------------------------------------------------------------------------------

    def _all_reduce_min(self, n: int) -> int:
        import torch
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_dp_group

        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=get_dp_group().cpu_group)
        return int(t.item())

    def _all_reduce_max(self, values: list[int]) -> list[int]:
        """Elementwise max over the data-parallel group (``auto``'s per-step agreement)."""
        import torch
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_dp_group

        t = torch.tensor(list(values), dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=get_dp_group().cpu_group)
        return t.tolist()

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
                 all_reduce_min: Callable[[int], int],
                 cut: Callable[[Split], str] | None = None) -> tuple[Split | None, str]:
    """The step's split, or None and why not (``batch`` None: this rank cannot split).

    The split falls on request boundaries when it can (within ``min_tokens`` and
    ``max_imbalance``): every decode step and every batch of enough even requests. Only when
    that split is refused, and ``cut`` is given, is a split that cuts a request tried (the same
    thresholds); ``cut(split)`` says why it cannot run ("" when it can), and then the
    boundary split's refusal stands.

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
    planned = whole(batch) if n == 1 else split(batch, n, **options)
    if planned.n != n and cut is not None:
        cutting = split(batch, n, split_requests=True, **options)
        if cutting.n == n and not cut(cutting):
            planned = cutting
    if agreeing and agree(planned.n, all_reduce_min) != planned.n:
        return None, planned.reason or "not split: another data-parallel rank refused"
    if planned.n != n:
        return None, planned.reason or "data-parallel ranks agreed not to split"
    return planned, ""


class _HostScope:
    """:class:`_Micro` for ops on the host thread: reused, no inference-mode switch (and
    :class:`~overlap.integrations.vllm.timing.TimedScope` while timing)."""

    __slots__ = ("local", "micro")

    def __init__(self, local: threading.local, micro: int) -> None:
        self.local, self.micro = local, micro

    def __enter__(self) -> None:
        self.local.micro = self.micro

    def __exit__(self, *exc: object) -> None:
        pass


class _Micro:
    """Sets the running thread's microbatch for the duration of one op call.

    While the adapter is timing it also adds the call's wall time to the step's op time (exact
    on the ``inline`` backend; with ``threads`` concurrent ops overlap, so it over-counts).
    """

    __slots__ = ("adapter", "micro", "mode", "clock")

    def __init__(self, adapter: DeepseekOverlap, micro: int) -> None:
        self.adapter, self.micro, self.mode, self.clock = adapter, micro, None, None

    def __enter__(self) -> None:
        adapter = self.adapter
        adapter._local.micro = self.micro
        if threading.get_ident() != adapter._host_thread:
            import torch

            self.mode = torch.inference_mode()
            self.mode.__enter__()
        if adapter.timer is not None:
            self.clock = adapter.timer.op_clock()

    def __exit__(self, *exc: object) -> None:
        if self.clock is not None:
            clock, self.clock = self.clock, None
            self.adapter.host.op_done(clock)
        if self.mode is not None:
            mode, self.mode = self.mode, None
            mode.__exit__(*exc)


def _ep_group(vllm_config: Any) -> tuple[int, int, Any]:
    """(size, rank, process group) of vLLM's expert-parallel group; (1, 0, None) without EP."""
    if not vllm_config.parallel_config.enable_expert_parallel:
        return 1, 0, None
    from vllm.distributed.parallel_state import get_ep_group

    group = get_ep_group()
    if group.world_size == 1:
        return 1, 0, None
    return group.world_size, group.rank_in_group, group.device_group


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
