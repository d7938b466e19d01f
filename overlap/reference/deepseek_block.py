"""The reference DeepSeek decoder block and a small model of them, in plain torch.

Each op of the DeepSeek template graph is one decorated method, so ``graph_of(block, ...)`` (or
:meth:`DeepseekMoEBlock.graph` at any attention grain) gives the template's graph with callables:

    MoE layer:    MLA ops (see ``attention``), gate, dispatch, permute, experts, unpermute,
                  combine, shared, merge
    dense layer:  MLA ops, post_norm, mlp

:meth:`ReferenceModel.plain_forward` runs every op of every layer unsplit, in graph order: the
result a plan must reproduce. Batch metadata reaches attention through a :class:`StepContext`
(see ``overlap.reference.context``)::

    model = ReferenceModel(TINY)
    split = overlap.plan.split(batch, 2)
    plan = build_plan("deepseek_prefill", model.model_graph(), split)
    out = Executor(plan, "threads").run(inputs, context=model.step(split, cache))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

from overlap.errors import ConfigError
from overlap.ops_graph import Collective, Graph, ModelGraph, Role, graph_of, op
from overlap.ops_graph.templates import ATTENTION_GRAINS, ParallelConfig, layer_graph
from overlap.ops_graph.templates.deepseek import coarsen
from overlap.plan.batch import Batch
from overlap.plan.plan import Plan
from overlap.plan.split import Split
from overlap.reference import moe
from overlap.reference.attention import MLAAttention, norm_weight, weight
from overlap.reference.config import TINY, ReferenceConfig
from overlap.reference.context import ForwardContext, KVCache, StepContext, step_context
from overlap.reference.kernels import Kernels, rope_table
from overlap.reference.moe import ExpertOutput, ExpertParallel, Permuted, Routed

INPUTS, OUTPUTS = ("hidden", "residual"), ("hidden_out", "residual_out")


class _Block(MLAAttention):
    """What both layer kinds share: configuration, attention and the graph/forward helpers."""

    routed = False

    def __init__(self, cfg: ReferenceConfig, layer_index: int, *, forward: ForwardContext,
                 kernels: Kernels, rope: Tensor, ep: ExpertParallel, seed: int) -> None:
        super().__init__()
        self.cfg, self.layer_index, self.forward = cfg, layer_index, forward
        self.kernels, self.rope, self.ep = kernels, rope, ep
        g = torch.Generator().manual_seed(seed * 100_003 + layer_index)
        self.init_attention(g)
        self.init_ffn(g)

    def init_ffn(self, g: torch.Generator) -> None:
        raise NotImplementedError

    def graph(self, attention: str = "one", phase: str = "prefill") -> Graph:
        """This layer's graph at ``attention`` grain, ops bound to this block, costs from the
        DeepSeek template (so the same graph can be simulated)."""
        if attention not in ATTENTION_GRAINS:
            raise ConfigError(f"'attention' must be one of {', '.join(ATTENTION_GRAINS)} "
                              f"(got {attention!r})")
        kind = "moe" if self.routed else "dense"
        fine = graph_of(self, inputs=INPUTS, outputs=OUTPUTS, name=f"{self.cfg.model.name}.{kind}")
        parallel = ParallelConfig(ep=self.ep.size) if self.ep.size > 1 else ParallelConfig()
        template = layer_graph(self.cfg.model, parallel, routed=self.routed, phase=phase,
                               attention="fine")
        ops = [attrs.evolve(o, cost=template[o.name].cost) if o.name in template else o
               for o in fine.ops]
        return coarsen(attrs.evolve(fine, ops=ops), attention)

    def plain_forward(self, hidden: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """Every op in graph order on the whole batch (inside a step's ``whole()`` context)."""
        graph = graph_of(self, inputs=INPUTS, outputs=OUTPUTS)
        env: dict[str, Any] = {"hidden": hidden, "residual": residual}
        for o in graph:
            out = o.fn(*(env[v] for v in o.reads))
            env.update(zip(o.writes, out if len(o.writes) > 1 else (out,)))
        return env["hidden_out"], env["residual_out"]


class DeepseekMoEBlock(_Block):
    """A DeepSeek-V3 MoE layer: MLA, grouped top-k routing, routed + shared SwiGLU experts."""

    routed = True

    def init_ffn(self, g: torch.Generator) -> None:
        m = self.cfg.model
        h, e, inner = m.hidden_size, m.n_routed_experts, m.moe_intermediate_size
        self.post_norm_w = norm_weight(g, h)
        self.w_router = weight(g, h, e)
        self.router_bias = torch.nn.Parameter(0.05 * torch.randn(e, generator=g),
                                              requires_grad=False)
        self.w_experts_gate_up = weight(g, e, h, 2 * inner)
        self.w_experts_down = weight(g, e, inner, h)
        shared = max(1, m.n_shared_experts) * inner
        self.w_shared_gate_up = weight(g, h, 2 * shared)
        self.w_shared_down = weight(g, shared, h)
        self.local_experts = self.ep.local(e)

    @op.compute(reads=("h", "res1"), writes=("moe_in", "residual_out", "topk"), role=Role.GATE)
    def gate(self, h: Tensor, res1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        residual_out = h + res1
        moe_in = self._norm(residual_out, self.post_norm_w)
        logits = self.kernels.linear(moe_in, self.w_router)
        return moe_in, residual_out, moe.grouped_topk(logits, self.router_bias, self.cfg,
                                                      self.kernels)

    @op.comm(Collective.ALL_TO_ALL, group="ep", size=lambda self: self.ep.size,
             reads=("moe_in", "topk"), writes="recv", role=Role.DISPATCH)
    def dispatch(self, moe_in: Tensor, topk: Tensor) -> Routed:
        return moe.dispatch(moe_in, topk, self.ep)

    @op.compute(reads="recv", writes="permuted", role=Role.PERMUTE)
    def permute(self, recv: Routed) -> Permuted:
        return moe.permute(recv)

    @op.compute(reads="permuted", writes="expert_rows", role=Role.EXPERTS)
    def experts(self, permuted: Permuted) -> Permuted:
        return moe.run_experts(permuted, self.w_experts_gate_up, self.w_experts_down,
                               self.local_experts, self.kernels)

    @op.compute(reads="expert_rows", writes="expert_out", role=Role.PERMUTE)
    def unpermute(self, expert_rows: Permuted) -> ExpertOutput:
        return moe.unpermute(expert_rows)

    @op.comm(Collective.ALL_TO_ALL, group="ep", size=lambda self: self.ep.size,
             reads="expert_out", writes="routed", role=Role.COMBINE)
    def combine(self, expert_out: ExpertOutput) -> Tensor:
        return moe.combine(expert_out, self.ep)

    @op.compute(reads="moe_in", writes="shared_out", role=Role.SHARED)
    def shared(self, moe_in: Tensor) -> Tensor:
        return self.kernels.swiglu(moe_in, self.w_shared_gate_up, self.w_shared_down)

    @op.compute(reads=("routed", "shared_out"), writes="hidden_out", role=Role.MERGE)
    def merge(self, routed: Tensor, shared_out: Tensor) -> Tensor:
        return routed + shared_out


class DeepseekDenseBlock(_Block):
    """One of DeepSeek's first ``first_k_dense_replace`` layers: MLA and a dense SwiGLU MLP."""

    def init_ffn(self, g: torch.Generator) -> None:
        m = self.cfg.model
        self.post_norm_w = norm_weight(g, m.hidden_size)
        self.w_mlp_gate_up = weight(g, m.hidden_size, 2 * m.intermediate_size)
        self.w_mlp_down = weight(g, m.intermediate_size, m.hidden_size)

    @op.compute(reads=("h", "res1"), writes=("moe_in", "residual_out"), role=Role.NORM)
    def post_norm(self, h: Tensor, res1: Tensor) -> tuple[Tensor, Tensor]:
        residual_out = h + res1
        return self._norm(residual_out, self.post_norm_w), residual_out

    @op.compute(reads="moe_in", writes="hidden_out", role=Role.MLP)
    def mlp(self, moe_in: Tensor) -> Tensor:
        return self.kernels.swiglu(moe_in, self.w_mlp_gate_up, self.w_mlp_down)


class ReferenceModel:
    """A stack of reference blocks: dense for the first ``first_k_dense_replace``, then MoE.

    config:  an HF-style dict (default :data:`TINY`) or a :class:`ReferenceConfig`.
    exact:   row-independent kernels, so microbatching is bitwise neutral (see ``kernels``).
    ep:      this process's expert-parallel place; every rank builds the same weights from
             ``seed`` and runs only its own experts.
    """

    def __init__(self, config: Mapping[str, Any] | ReferenceConfig = TINY, *,
                 num_layers: int | None = None, exact: bool = True, seed: int = 0,
                 ep: ExpertParallel | None = None) -> None:
        cfg = config if isinstance(config, ReferenceConfig) else ReferenceConfig.from_hf(config)
        m = cfg.model
        if not m.q_lora_rank:
            raise ConfigError(f"model {m.name!r}: the reference block needs 'q_lora_rank' "
                              "(low-rank queries, as in DeepSeek-V2/V3)")
        count = m.num_layers if num_layers is None else num_layers
        if count < 1:
            raise ConfigError(f"'num_layers' must be >= 1 (got {count})")
        self.cfg, self.forward, self.kernels = cfg, ForwardContext(), Kernels(exact)
        self.ep = ep or ExpertParallel()
        rope = rope_table(m.qk_rope_head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                          torch.float32)
        kw = dict(forward=self.forward, kernels=self.kernels, rope=rope, ep=self.ep, seed=seed)
        self.blocks = [
            (DeepseekDenseBlock if i < m.first_k_dense_replace else DeepseekMoEBlock)(cfg, i, **kw)
            for i in range(count)
        ]

    @property
    def cache_width(self) -> int:
        """Columns of a KV-cache row: MLA's latent plus the rotary key."""
        return self.cfg.model.kv_lora_rank + self.cfg.model.qk_rope_head_dim

    def graphs(self, attention: str = "one", phase: str = "prefill") -> tuple[Graph, ...]:
        """Each layer's bound graph at ``attention`` grain."""
        return tuple(b.graph(attention, phase) for b in self.blocks)

    def model_graph(self, attention: str = "one", phase: str = "prefill") -> ModelGraph:
        """The model's graph for planning; its ops are bound, so an executor can run it as is."""
        return ModelGraph(self.cfg.model.name, self.graphs(attention, phase))

    def cache(self, contexts: Mapping[int, int] | None = None, *, seed: int = 0) -> KVCache:
        """A KV cache holding ``contexts[rid]`` seeded random rows per layer for request ``rid``."""
        return KVCache.seeded(len(self.blocks), self.cache_width, contexts or {}, seed=seed)

    def step(self, batch_or_split: Batch | Split, cache: KVCache,
             request_ids: Sequence[int] | None = None) -> StepContext:
        """The metadata of one step (grows ``cache`` to the step's lengths); pass it to
        ``Executor.run(context=...)``. ``request_ids`` name the batch's requests in ``cache``."""
        return step_context(self.forward, batch_or_split, cache, request_ids)

    def inputs(self, tokens: int, *, seed: int = 0) -> dict[str, Tensor]:
        """Random first-layer inputs: ``hidden`` ~ N(0, 1) and a zero ``residual``."""
        g = torch.Generator().manual_seed(seed)
        hidden = torch.randn(tokens, self.cfg.model.hidden_size, generator=g)
        return {"hidden": hidden, "residual": torch.zeros_like(hidden)}

    def plain_forward(self, hidden: Tensor, residual: Tensor, step: StepContext) -> dict[str, Tensor]:
        """The unsplit forward of every layer: the reference result."""
        with step.whole():
            for block in self.blocks:
                hidden, residual = block.plain_forward(hidden, residual)
        return {"hidden_out": hidden, "residual_out": residual}

    def run(self, plan: Plan, inputs: Mapping[str, Tensor], step: StepContext, *,
            backend: str = "inline") -> dict[str, Tensor]:
        """Execute ``plan`` (built on this model's graphs or the template's) on ``backend``."""
        from overlap.backends import Executor

        first = plan.model.layers[0]
        grain = "one" if "attn" in first else "two_stage" if "attn0" in first else "fine"
        layers = self.graphs(grain)
        with Executor(plan, backend) as executor:
            return executor.run(inputs, layers=layers, context=step)
