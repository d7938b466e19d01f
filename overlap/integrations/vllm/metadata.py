"""Per-microbatch attention metadata and forward contexts, made with vLLM's own machinery.

vLLM builds one attention metadata object per step. The plugin's builder hook only remembers
the inputs of that build (:class:`Pending`) and the builder that made it; when a step is split,
:func:`build_microbatch_metadata` cuts the step's common metadata per microbatch
(:func:`slice_common`: vLLM's ``split_attn_metadata``, also for a cut inside a request) and
rebuilds each microbatch's metadata with the builder's *most-derived* ``build`` (the hook sits on
``MLACommonMetadataBuilder.build``, but the platform may pick a subclass that adds fields, such
as CPU ``AMX_MLA``'s ``req_to_token``), and :func:`microbatch_contexts` makes one forward
context per microbatch with its metadata and its slice of the KV-cache slot mapping. A
microbatch that continues a cut request must read that request's cached context
(:func:`check_continuation`).

Builders may keep state between builds (persistent buffers, the MLA prefill backend's prepared
metadata), so each microbatch gets its own builder, made like the original (what vLLM's
dual-batch overlap does with one builder per ubatch): :class:`BuilderPool`. A rebuild runs
behind a re-entry guard, so the hook does not treat it as a new step.

One vLLM quirk is still handled here: the MLA prefill backend keeps the prefill metadata on the
backend object that its builder shares across builds (``prepare_metadata``), so the right one is
bound again before each microbatch's attention (:func:`bind_prefill`) and the whole step's
afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from overlap.plan.batch import Batch
from overlap.plan.split import Split

PENDING_ATTR = "_overlap_pending"
ARGS_ATTR = "_overlap_init_args"  # set on each MLA builder at construction (plugin's __new__ hook)

_guard = threading.local()


@attrs.frozen
class Pending:
    """The arguments of one metadata build, kept so microbatch metadata can be built later."""

    builder: Any  # the builder instance that built the step's metadata
    common_prefix_len: int
    common: Any  # CommonAttentionMetadata
    fast_build: bool


class SplitError(Exception):
    """The step's metadata cannot be split; the message says why (the step runs stock)."""


class CutError(SplitError):
    """A microbatch that continues a cut request would not read its context: the step runs
    stock, and the adapter cuts at request boundaries only from then on."""


def rebuilding() -> bool:
    """True while :func:`build_microbatch_metadata` is building (the hook stays out of it)."""
    return getattr(_guard, "on", False)


@contextlib.contextmanager
def _rebuild_guard() -> Iterator[None]:
    if rebuilding():
        raise SplitError("microbatch metadata build re-entered (a builder builds through the "
                         "adapter)")
    _guard.on = True
    try:
        yield
    finally:
        _guard.on = False


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


class BuilderPool:
    """One builder per microbatch for each step builder, made once and reused every step.

    A clone is the builder's own class constructed with the arguments the original was
    constructed with (recorded by the plugin), so it owns its buffers and prefill backend.
    """

    def __init__(self) -> None:
        self._clones: dict[int, tuple[Any, list[Any]]] = {}

    def get(self, builder: Any, n: int) -> list[Any]:
        entry = self._clones.get(id(builder))
        if entry is None or entry[0] is not builder or (
                entry[1] and type(entry[1][0]) is not type(builder)):
            entry = (builder, [])  # keeps the original alive, so its id is not reused
            self._clones[id(builder)] = entry
        clones = entry[1]
        while len(clones) < n:
            clones.append(clone_builder(builder))
        return clones[:n]


def clone_builder(builder: Any) -> Any:
    """A new builder like ``builder``: its class, built with the same constructor arguments."""
    recorded = builder.__dict__.get(ARGS_ATTR)
    if recorded is None:
        raise SplitError(f"{type(builder).__name__} was constructed before the plugin's hook was "
                         "installed (its constructor arguments are unknown)")
    args, kwargs = recorded
    try:
        return type(builder)(*args, **kwargs)
    except Exception as exc:
        raise SplitError(f"could not make a per-microbatch {type(builder).__name__}: "
                         f"{type(exc).__name__}: {exc}") from exc


class StepViews:
    """Per-microbatch views of a step's persistent buffers, made once per split and memory.

    vLLM hands every step new view objects of the same persistent buffers (query offsets,
    sequence lengths, block table, slot mapping, positions), and each slice of one costs a few
    microseconds of host time. ``get(split, what, tensors, make)`` returns what ``make()`` made
    when last asked for ``what`` with this Split object and tensors over the same memory (data
    pointer, shape, strides, dtype, device), else calls ``make()`` and keeps its result.

    Sound because an entry holds the views it made, so their storage stays allocated and no
    other tensor can take its address: an equal key is the same memory, and a view of it reads
    this step's contents. What ``make`` *computes* (not views) may be kept only when the split
    fixes it, as it fixes the query offsets (a Split is made from the step's query lengths).
    """

    def __init__(self, capacity: int = 64) -> None:
        self._entries: dict[tuple[int, str], tuple[Split, tuple, Any]] = {}
        self._capacity = capacity

    def get(self, split: Split, what: str, tensors: tuple[Any, ...], make: Callable[[], Any]
            ) -> Any:
        memory = tuple(None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype,
                                               t.device) for t in tensors)
        key = (id(split), what)
        entry = self._entries.get(key)
        if entry is not None and entry[0] is split and entry[1] == memory:
            return entry[2]
        value = make()
        if len(self._entries) >= self._capacity:
            self._entries.clear()
        self._entries[key] = (split, memory, value)  # the split kept: its id is not reused
        return value


@attrs.frozen
class _Cut:
    """One microbatch's part of the step's common metadata that its split and buffers fix."""

    first: int  # its requests [first, last)
    last: int
    tokens: int
    tail: int  # tokens of its last request left to the next microbatch (a cut)
    query_len: int
    loc: Any
    loc_cpu: Any
    seq: Any  # views: with a tail, copied and shortened per step (the lengths change)
    seq_upper: Any
    block_table: Any
    slot_mapping: Any


def slice_common(common: Any, split: Split, views: StepViews | None = None) -> list[Any]:
    """Each microbatch's ``CommonAttentionMetadata``: the step's, cut at the split's token
    boundaries, which may fall inside a request.

    The same fields and values as vLLM's ``split_attn_metadata`` (tested against it), with
    fewer tensor operations: the request offsets come from one host list, and the per-request
    tensors (and the first microbatch's offsets) are views unless a cut changes them; nothing
    here writes to the step's tensors. With ``views``, the views and offsets are made once per
    split and buffer (:class:`StepViews`). A request cut in two appears in both
    microbatches: the first piece as a shorter request (its query and ``seq_lens`` end at the
    cut), the second with its query starting at the cut and the request's full ``seq_lens``, so
    its context is the first piece's tokens plus what was cached before; its attention reads
    that context from the KV cache, which the first piece writes (the plan orders it: see
    :func:`overlap.plan.deps.unordered_kv_reads`).
    """
    from vllm.v1.attention.backend import CommonAttentionMetadata

    upper = common.seq_lens_cpu_upper_bound
    if views is None:
        cuts = _cuts(common, split)
    else:
        cuts = views.get(split, "common", (
            common.query_start_loc, common.query_start_loc_cpu, common.seq_lens, upper,
            common.block_table_tensor, common.slot_mapping), lambda: _cuts(common, split))
    upper_list = upper.tolist() if upper is not None else None
    out = []
    for c in cuts:
        seq, seq_upper, max_seq = c.seq, c.seq_upper, common.max_seq_len
        if c.tail:  # the first piece of a cut request: its sequence ends at the cut
            seq = seq.clone()
            seq[-1] -= c.tail
            if seq_upper is not None:
                seq_upper = seq_upper.clone()
                seq_upper[-1] -= c.tail
        if upper_list is not None:
            ups = upper_list[c.first:c.last]
            max_seq = max(max_seq, *ups[:-1], ups[-1] - c.tail)
        out.append(CommonAttentionMetadata(
            query_start_loc=c.loc, query_start_loc_cpu=c.loc_cpu,
            seq_lens=seq, num_reqs=c.last - c.first, num_actual_tokens=c.tokens,
            max_query_len=c.query_len or common.max_query_len, max_seq_len=max_seq,
            block_table_tensor=c.block_table, slot_mapping=c.slot_mapping,
            seq_lens_cpu_upper_bound=seq_upper))
    return out


def _cuts(common: Any, split: Split) -> list[_Cut]:
    starts_cpu = common.query_start_loc_cpu
    starts = starts_cpu[: common.num_reqs + 1].tolist()
    upper = common.seq_lens_cpu_upper_bound
    out = []
    for micro in split.micro:
        first, last = micro.pieces[0].request, micro.pieces[-1].request + 1
        a, b = micro.token_start, micro.token_end
        head, tail = a - starts[first], starts[last] - b  # tokens cut off either end
        local = [min(max(x, a), b) - a for x in starts[first:last + 1]]
        loc = common.query_start_loc[first:last + 1]
        if a:  # the first microbatch's offsets already start at 0: its view serves
            loc = loc - a
        if head or tail:
            loc = loc.clamp(0, b - a) if not a else loc.clamp_(0, b - a)
        # Likewise its host offsets, when no cut changes them.
        loc_cpu = starts_cpu[first:last + 1] if not a and not tail else starts_cpu.new_tensor(local)
        out.append(_Cut(
            first=first, last=last, tokens=b - a, tail=tail,
            query_len=max(y - x for x, y in zip(local, local[1:])), loc=loc, loc_cpu=loc_cpu,
            seq=common.seq_lens[first:last],
            seq_upper=upper[first:last] if upper is not None else None,
            block_table=common.block_table_tensor[first:last],
            slot_mapping=common.slot_mapping[a:b]))
    return out


def build_microbatch_metadata(pending: Pending, split: Split, builders: list[Any],
                              views: StepViews | None = None) -> list[Any]:
    """One attention metadata object per microbatch, built by its own builder's ``build``
    (``views``: see :func:`slice_common`).

    ``type(builder).build`` is the most-derived build, whatever subclass the platform chose.
    Raises :class:`SplitError` (with the builder's error) when a build fails.
    """
    name = type(pending.builder).__name__
    try:
        commons = slice_common(pending.common, split, views)
        with _rebuild_guard():
            built = [type(b).build(b, pending.common_prefix_len, c, pending.fast_build)
                     for b, c in zip(builders, commons)]
        for micro, metadata in zip(split.micro, built):
            if micro.continues_request:
                check_continuation(metadata, name)
        return built
    except SplitError:
        raise
    except Exception as exc:
        raise SplitError(f"{name} could not build microbatch metadata: "
                         f"{type(exc).__name__}: {exc}") from exc


def check_continuation(metadata: Any, name: str) -> None:
    """Raise :class:`CutError` unless ``metadata`` (a microbatch whose first request continues
    one the previous microbatch cut) makes that request's attention read its context.

    vLLM orders decode rows first, so the continued request is row 0: a decode row reads its
    whole sequence from the KV cache; a prefill row reads the cached part through MLA's
    chunked-context metadata (``prefill.chunked_context``; AMX_MLA's extend kernel reads the
    same context). A builder whose metadata has neither is not one this cut can serve.
    """
    if getattr(metadata, "num_decodes", 0):
        return
    prefill = getattr(metadata, "prefill", None)
    if getattr(prefill, "chunked_context", None) is None:
        raise CutError(f"{name} built no cached context for a request cut by the previous "
                       "microbatch (its second piece would not attend to the first)")


def bind_prefill(metadata: Any) -> None:
    """Re-bind ``metadata``'s prefill part on its (shared, stateful) prefill backend."""
    prefill = getattr(metadata, "prefill", None)
    backend = getattr(prefill, "prefill_backend", None) if prefill is not None else None
    if backend is not None:
        backend.prepare_metadata(prefill)


def microbatch_contexts(ctx: Any, split: Split, subs: dict[int, list[Any]],
                        dp_metadata: list[Any] | None, views: StepViews | None = None
                        ) -> list[Any]:
    """A forward context per microbatch: its attention metadata and slot-mapping slice.

    ``subs`` maps ``id(step metadata)`` to that metadata's per-microbatch objects. Layers that
    share one slot-mapping tensor (one KV-cache group) share its slice too. ``views``: the
    slices are made once per split and buffer (:class:`StepViews`).
    """
    replaced = _replacer(ctx)
    names = list(ctx.slot_mapping)
    tensors = (*ctx.slot_mapping.values(), ctx.is_padding)

    def make() -> list[tuple[dict[str, Any], Any]]:
        per_micro = []
        for micro in split.micro:
            a, b = micro.token_start, micro.token_end
            cut: dict[int, Any] = {}
            slots = {}
            for name, sm in zip(names, tensors):
                piece = cut.get(id(sm))
                if piece is None:
                    piece = cut[id(sm)] = sm[a:b]
                slots[name] = piece
            per_micro.append((slots, tensors[-1][a:b] if tensors[-1] is not None else None))
        return per_micro

    sliced = make() if views is None else views.get(split, "slot_mapping", tensors, make)
    out = []
    for m, (slots, padding) in enumerate(sliced):
        changes: dict[str, Any] = {
            "attn_metadata": {name: subs[id(md)][m] for name, md in ctx.attn_metadata.items()},
            "slot_mapping": dict(slots),  # the context's own dict: vLLM's is per step too
        }
        if padding is not None:
            changes["is_padding"] = padding
        if dp_metadata is not None:
            changes["dp_metadata"] = dp_metadata[m]
        out.append(replaced(changes))
    return out


def _replacer(ctx: Any) -> Callable[[dict[str, Any]], Any]:
    """``changes -> dataclasses.replace(ctx, **changes)``, at a fraction of its cost.

    ``replace`` builds the new object through ``__init__`` with every init field's current
    value; this copies the same values directly. It skips ``__post_init__``, which for vLLM's
    ``ForwardContext`` only asserts that the (unchanged) CUDA-graph mode is valid. A dataclass
    with non-init fields (which ``replace`` resets) or slots goes through ``replace``.
    """
    cls = type(ctx)
    names = _FIELDS.get(cls, ())
    if names == ():
        fields = dataclasses.fields(cls)
        names = _FIELDS[cls] = [f.name for f in fields] if all(f.init for f in fields) else None
    if names is None or not hasattr(ctx, "__dict__"):
        return lambda changes: dataclasses.replace(ctx, **changes)
    values = ctx.__dict__

    def replaced(changes: dict[str, Any]) -> Any:
        new = object.__new__(cls)
        new.__dict__.update({name: values[name] for name in names})
        new.__dict__.update(changes)
        return new

    return replaced


_FIELDS: dict[type, list[str] | None] = {}  # per context class: its fields, None: use replace
