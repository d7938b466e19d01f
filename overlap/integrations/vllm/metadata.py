"""Per-microbatch attention metadata and forward contexts, made with vLLM's own machinery.

vLLM builds one attention metadata object per step. The plugin's builder hook only remembers
the inputs of that build (:class:`Pending`); when a step is split, :func:`microbatch_contexts`
rebuilds the metadata of each microbatch with ``split_attn_metadata`` and the same builder (what
vLLM's dual-batch overlap does on GPU), and makes one forward context per microbatch with its
metadata and its slice of the KV-cache slot mapping.

One vLLM quirk is handled here: the CPU MLA prefill backend keeps the prefill metadata on the
backend object shared by every metadata build (``prepare_metadata``), so the right one is bound
again before each microbatch's attention (:func:`bind_prefill`) and the whole step's afterwards.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import attrs

from overlap.plan.batch import Batch
from overlap.plan.split import Split

PENDING_ATTR = "_overlap_pending"


@attrs.frozen
class Pending:
    """The arguments of one metadata build, kept so microbatch metadata can be built later."""

    build: Any  # the builder's unpatched ``build``, bound to it
    common_prefix_len: int
    common: Any  # CommonAttentionMetadata
    fast_build: bool


def batch_of(common: Any) -> Batch | None:
    """The step's requests as a :class:`Batch`, or None when a request has no new token."""
    n = common.num_reqs
    starts = common.query_start_loc_cpu[: n + 1].tolist()
    query = [b - a for a, b in zip(starts, starts[1:])]
    if not query or min(query) < 1:
        return None
    seq = common.seq_lens_cpu_upper_bound
    seq = seq[:n].tolist() if seq is not None else query
    return Batch.of((q, max(0, s - q)) for q, s in zip(query, seq))


def ubatch_slices(split: Split) -> list[Any]:
    """vLLM ``UBatchSlice`` objects (request and token ranges) of a request-boundary split."""
    from vllm.v1.worker.ubatch_utils import UBatchSlice

    out = []
    for micro in split.micro:
        first, last = micro.pieces[0].request, micro.pieces[-1].request
        out.append(UBatchSlice(slice(first, last + 1), slice(micro.token_start, micro.token_end)))
    return out


def build_microbatch_metadata(pending: Pending, split: Split) -> list[Any]:
    """One attention metadata object per microbatch, built by the step's own builder."""
    from vllm.v1.worker.ubatch_utils import split_attn_metadata

    commons = split_attn_metadata(ubatch_slices(split), pending.common)
    return [pending.build(pending.common_prefix_len, c, pending.fast_build) for c in commons]


def bind_prefill(metadata: Any) -> None:
    """Re-bind ``metadata``'s prefill part on its (shared, stateful) prefill backend."""
    prefill = getattr(metadata, "prefill", None)
    backend = getattr(prefill, "prefill_backend", None) if prefill is not None else None
    if backend is not None:
        backend.prepare_metadata(prefill)


def microbatch_contexts(ctx: Any, split: Split, subs: dict[int, list[Any]],
                        dp_metadata: list[Any] | None) -> list[Any]:
    """A forward context per microbatch: its attention metadata and slot-mapping slice.

    ``subs`` maps ``id(step metadata)`` to that metadata's per-microbatch objects.
    """
    out = []
    for m, micro in enumerate(split.micro):
        a, b = micro.token_start, micro.token_end
        changes: dict[str, Any] = {
            "attn_metadata": {name: subs[id(md)][m] for name, md in ctx.attn_metadata.items()},
            "slot_mapping": {name: sm[a:b] for name, sm in ctx.slot_mapping.items()},
        }
        if ctx.is_padding is not None:
            changes["is_padding"] = ctx.is_padding[a:b]
        if dp_metadata is not None:
            changes["dp_metadata"] = dp_metadata[m]
        out.append(dataclasses.replace(ctx, **changes))
    return out
