"""The MoE half of the block: DeepSeek-V3 routing, routed experts across ranks, shared experts.

Routing (``grouped_topk``): sigmoid scores plus a per-expert bias choose the experts — the
``n_group`` groups are ranked by the sum of their two best biased scores, only the best
``topk_group`` groups stay eligible, and the top ``k`` of those win — while the unbiased scores,
renormalised and scaled, weight the winners. The result is a dense ``[tokens, experts]`` weight
matrix, zero where a token does not go, so routing is one tensor value in the graph.

Expert parallelism (:class:`ExpertParallel`): rank ``r`` of ``size`` owns experts
``[r * E / size, (r + 1) * E / size)``. ``dispatch`` sends each token once to every rank that owns
one of its experts, with its weights for that rank's experts; ``combine`` sends the weighted
partial sums back, and the owner adds them in rank order. Both are ``all_to_all_single`` calls
(gloo implements it, with uneven splits; the counts travel first in a small all-to-all of their
own). With one rank both are local and move nothing.

With top-2 routing, a token's result is ``w_a * y_a + w_b * y_b`` added in the same order whether
its experts sit on one rank or two, so expert parallelism is bitwise equal to one process under
exact kernels; with more experts per token the sum's grouping follows the rank layout.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from overlap.errors import ConfigError
from overlap.reference.config import ReferenceConfig
from overlap.reference.kernels import Kernels


@attrs.frozen
class ExpertParallel:
    """This process's place in the expert-parallel group (``group=None``: one process)."""

    size: int = 1
    rank: int = 0
    group: Any = None

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ConfigError(f"'rank' must be in 0..{self.size - 1} (got {self.rank})")
        if self.size > 1 and self.group is None:
            raise ConfigError(f"expert parallelism over {self.size} ranks needs a process group")

    @classmethod
    def of(cls, group: Any) -> ExpertParallel:
        """The place of this process in ``group`` (a torch.distributed process group)."""
        import torch.distributed as dist

        return cls(dist.get_world_size(group), dist.get_rank(group), group)

    def local(self, n_experts: int) -> range:
        """The experts this rank owns."""
        if n_experts % self.size:
            raise ConfigError(f"'n_routed_experts' ({n_experts}) must be divisible by the "
                              f"expert-parallel size ({self.size})")
        per = n_experts // self.size
        return range(self.rank * per, (self.rank + 1) * per)


def grouped_topk(scores_in: Tensor, bias: Tensor, cfg: ReferenceConfig, k: Kernels) -> Tensor:
    """Dense ``[T, E]`` routing weights from router logits (DeepSeek-V3's ``noaux_tc``)."""
    m = cfg.model
    if cfg.scoring_func == "sigmoid":
        scores = k.sigmoid(scores_in.float())
    else:
        scores = torch.softmax(scores_in.float(), dim=-1)
    choice = scores + bias
    tokens, experts = choice.shape
    grouped = choice.view(tokens, cfg.n_group, experts // cfg.n_group)
    group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
    keep = group_score.topk(cfg.topk_group, dim=-1).indices
    group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
    eligible = group_mask.repeat_interleave(experts // cfg.n_group, dim=1)
    ids = choice.masked_fill(~eligible, float("-inf")).topk(m.num_experts_per_tok, dim=-1).indices
    w = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * cfg.routed_scaling_factor
    return torch.zeros_like(scores).scatter_(1, ids, w).to(scores_in.dtype)


@attrs.frozen
class Routed:
    """Tokens received for this rank's experts, and what ``combine`` needs to send them back."""

    rows: Tensor  # [N, hidden] tokens received from every rank, source rank by source rank
    weights: Tensor  # [N, local experts]
    send_index: tuple[Tensor, ...]  # per destination rank: which local tokens were sent there
    recv_counts: tuple[int, ...]  # rows received from each rank
    tokens: int  # local tokens before dispatch


def _all_to_all(send: Tensor, send_counts: list[int], recv_counts: list[int],
                ep: ExpertParallel) -> Tensor:
    import torch.distributed as dist

    recv = send.new_empty((sum(recv_counts),) + tuple(send.shape[1:]))
    dist.all_to_all_single(recv, send.contiguous(), output_split_sizes=recv_counts,
                           input_split_sizes=send_counts, group=ep.group)
    return recv


def dispatch(moe_in: Tensor, topk: Tensor, ep: ExpertParallel) -> Routed:
    """Send each token to the ranks owning one of its experts (local when ``ep.size == 1``)."""
    per = topk.shape[1] // ep.size
    by_rank = topk.view(topk.shape[0], ep.size, per)
    index = tuple(torch.nonzero((by_rank[:, r] != 0).any(-1)).flatten() for r in range(ep.size))
    payload = torch.cat([torch.cat([moe_in[i], by_rank[i, r]], dim=-1)
                         for r, i in enumerate(index)])
    send_counts = [int(i.numel()) for i in index]
    if ep.size == 1:
        recv, recv_counts = payload, send_counts
    else:
        import torch.distributed as dist

        counts = torch.tensor(send_counts, dtype=torch.int64)
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts, group=ep.group)
        recv_counts = got.tolist()
        recv = _all_to_all(payload, send_counts, recv_counts, ep)
    rows, weights = recv.split([moe_in.shape[1], per], dim=-1)
    return Routed(rows, weights, index, tuple(recv_counts), moe_in.shape[0])


@attrs.frozen
class Permuted:
    """Received rows in expert order: local expert ``j``'s rows are the next ``len(index[j])``
    rows of ``rows`` (after the experts ran: their outputs, in the same order)."""

    rows: Tensor
    index: tuple[Tensor, ...]  # per local expert: which received rows it got
    routed: Routed


@attrs.frozen
class ExpertOutput:
    """The experts' weighted partial sums, row for row with the :class:`Routed` they came from."""

    rows: Tensor
    routed: Routed


def permute(routed: Routed) -> Permuted:
    """Gather the received rows into expert order (one copy per (row, local expert))."""
    index = tuple(torch.nonzero(routed.weights[:, j] != 0).flatten()
                  for j in range(routed.weights.shape[1]))
    rows = torch.cat([routed.rows[i] for i in index]) if index else routed.rows[:0]
    return Permuted(rows, index, routed)


def run_experts(permuted: Permuted, gate_up: Tensor, down: Tensor, local: range,
                k: Kernels) -> Permuted:
    """Each local expert on its contiguous rows."""
    parts, start = [], 0
    for i, e in zip(permuted.index, local):
        n = int(i.numel())
        if n:
            parts.append(k.swiglu(permuted.rows[start:start + n], gate_up[e], down[e]))
        start += n
    rows = torch.cat(parts) if parts else permuted.rows.new_zeros(0, down.shape[-1])
    return Permuted(rows, permuted.index, permuted.routed)


def unpermute(expert_rows: Permuted) -> ExpertOutput:
    """Weight each expert row and sum it back onto its received row, in expert order."""
    routed = expert_rows.routed
    out = torch.zeros_like(routed.rows)
    start = 0
    for j, i in enumerate(expert_rows.index):
        n = int(i.numel())
        if n:
            out.index_add_(0, i, expert_rows.rows[start:start + n] * routed.weights[i, j:j + 1])
        start += n
    return ExpertOutput(out, routed)


def combine(expert_out: ExpertOutput, ep: ExpertParallel) -> Tensor:
    """Return the partial sums to their tokens' ranks and add them there, in rank order."""
    out, routed = expert_out.rows, expert_out.routed
    send_counts = [int(i.numel()) for i in routed.send_index]
    if ep.size > 1:
        out = _all_to_all(out, list(routed.recv_counts), send_counts, ep)
    result = out.new_zeros(routed.tokens, out.shape[1])
    for index, part in zip(routed.send_index, out.split(send_counts)):
        result.index_add_(0, index, part)
    return result
