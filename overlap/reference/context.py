"""How a step's batch metadata reaches the attention ops: a context entered per microbatch.

An op's callable receives only the values it reads (``hidden``, ``q``, ...), but attention also
needs to know which request each token belongs to, its position, and where that request's KV
cache is. That is not a tensor flowing between ops — it is a property of the *microbatch*, the
same for every op and layer — so it travels beside the graph, not through it:

    step = model.step(split, cache)          # one StepContext per forward step
    Executor(plan, "threads").run(inputs, context=step)

The executor enters ``step(m)`` around every op call of microbatch ``m`` (on whichever thread or
stream runs it), which sets the model's context variable to that microbatch's :class:`MicroMeta`;
the attention ops read it with ``forward.current()``. A context variable is per thread, so two
microbatches running at once on two workers each see their own. The graph keeps exactly the
template's values, and an op run outside a step fails with a message saying so.

The KV cache (:class:`KVCache`) holds, per layer and request, MLA's compressed latent and rotary
key rows. ``model.step`` grows each request's rows to its length after the step; ``kv_prep``
writes the new rows in place and ``core_attn`` reads the rows before its own tokens from there.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence

import attrs
import torch
from torch import Tensor

from overlap.errors import ConfigError, OverlapError
from overlap.plan.batch import Batch
from overlap.plan.split import MicroBatch, Piece, Split, whole


class KVCache:
    """Per layer and request id, the cached latent + rotary-key rows (``[length, kvr + dr]``)."""

    def __init__(self, layers: int, width: int, dtype: torch.dtype = torch.float32) -> None:
        self.width, self.dtype = width, dtype
        self.rows: list[dict[int, Tensor]] = [{} for _ in range(layers)]

    @classmethod
    def seeded(cls, layers: int, width: int, contexts: Mapping[int, int], *, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> KVCache:
        """A cache whose request ``rid`` holds ``contexts[rid]`` random rows per layer, the same
        for a given (seed, layer, rid) whichever process builds it."""
        cache = cls(layers, width, dtype)
        for layer in range(layers):
            for rid, length in contexts.items():
                g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 10_007 + rid)
                cache.rows[layer][rid] = torch.randn(length, width, generator=g).to(dtype)
        return cache

    def clone(self) -> KVCache:
        """An independent copy (to run the same step twice)."""
        other = KVCache(len(self.rows), self.width, self.dtype)
        other.rows = [{rid: t.clone() for rid, t in layer.items()} for layer in self.rows]
        return other

    def grow(self, rid: int, context_len: int, total: int) -> None:
        """Make request ``rid`` hold ``total`` rows per layer, keeping its first ``context_len``."""
        for layer, rows in enumerate(self.rows):
            old = rows.get(rid)
            have = 0 if old is None else old.shape[0]
            if have < context_len:
                raise ConfigError(f"request {rid} has context_len {context_len} but the KV cache "
                                  f"of layer {layer} holds {have} rows for it")
            new = torch.zeros(total, self.width, dtype=self.dtype)
            if context_len:
                new[:context_len] = old[:context_len]
            rows[rid] = new


@attrs.frozen
class MicroMeta:
    """What a microbatch's attention needs: per piece, the request's id and full length."""

    index: int
    pieces: tuple[Piece, ...]
    request_ids: tuple[int, ...]  # one per piece
    totals: tuple[int, ...]  # per piece: the request's length at the end of the step
    positions: Tensor  # [tokens] absolute position of each token
    cache: KVCache

    @property
    def tokens(self) -> int:
        return int(self.positions.shape[0])


class ForwardContext:
    """The context variable through which ops see the current microbatch; one per model."""

    def __init__(self) -> None:
        self._var: contextvars.ContextVar[MicroMeta] = contextvars.ContextVar("microbatch")

    @contextlib.contextmanager
    def using(self, meta: MicroMeta) -> Iterator[MicroMeta]:
        token = self._var.set(meta)
        try:
            yield meta
        finally:
            self._var.reset(token)

    def current(self, op: str) -> MicroMeta:
        """The running microbatch's metadata; ``op`` names the asker in the error."""
        try:
            return self._var.get()
        except LookupError:
            raise OverlapError(
                f"op {op!r} needs the batch metadata but ran outside a step: run it under "
                "'with step(m):' or pass context=step to Executor.run (step = model.step(...))"
            ) from None


class StepContext:
    """One forward step's metadata; ``step(m)`` is the executor's per-microbatch context hook."""

    def __init__(self, forward: ForwardContext, split: Split, cache: KVCache,
                 request_ids: Sequence[int] | None = None) -> None:
        batch = split.batch
        ids = tuple(range(len(batch))) if request_ids is None else tuple(request_ids)
        if len(ids) != len(batch) or len(set(ids)) != len(ids):
            raise ConfigError(f"'request_ids' must name each of the {len(batch)} requests once "
                              f"(got {list(ids)})")
        for rid, r in zip(ids, batch.requests):
            cache.grow(rid, r.context_len, r.context_len + r.query_len)
        self.forward, self.split, self.cache, self.request_ids = forward, split, cache, ids
        self._micro = tuple(self._meta(m) for m in split.micro)
        self._whole = self._meta(whole(batch).micro[0])

    def _meta(self, micro: MicroBatch) -> MicroMeta:
        reqs = self.split.batch.requests
        positions = [torch.arange(p.context_len, p.context_len + p.length) for p in micro.pieces]
        return MicroMeta(
            micro.index, micro.pieces,
            tuple(self.request_ids[p.request] for p in micro.pieces),
            tuple(reqs[p.request].context_len + reqs[p.request].query_len for p in micro.pieces),
            torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long),
            self.cache)

    def __call__(self, m: int) -> contextlib.AbstractContextManager[MicroMeta]:
        """Enter microbatch ``m``'s metadata (what ``Executor.run(context=...)`` calls)."""
        return self.forward.using(self._micro[m])

    def whole(self) -> contextlib.AbstractContextManager[MicroMeta]:
        """Enter the unsplit batch's metadata (the plain forward)."""
        return self.forward.using(self._whole)


def step_context(forward: ForwardContext, batch_or_split: Batch | Split, cache: KVCache,
                 request_ids: Sequence[int] | None = None) -> StepContext:
    """A :class:`StepContext` for a split, or for a batch run whole."""
    split = batch_or_split if isinstance(batch_or_split, Split) else whole(batch_or_split)
    return StepContext(forward, split, cache, request_ids)
