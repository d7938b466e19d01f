"""A step's batch: per-request query and context lengths.

Prefill, decode and mixed (chunked-prefill) batches are all lists of requests, each computing
``query_len`` new tokens after ``context_len`` tokens already in its KV cache. Tokens are laid
out request after request, which is the order every microbatch split preserves.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable

import attrs

from overlap.errors import ConfigError
from overlap.ops_graph.shape import Shape

MAX_REQUESTS = 1 << 24
"""The most requests one step's batch may hold (16.7M): a million-request prefill plans in
seconds, while a billion would exhaust memory before any error could be reported."""


def _check_count(requests: int) -> None:
    if requests > MAX_REQUESTS:
        raise ConfigError(f"'requests' must be <= {MAX_REQUESTS} (got {requests})")


@attrs.frozen
class Request:
    """One sequence in the step."""

    query_len: int
    context_len: int = 0

    def __attrs_post_init__(self) -> None:
        if self.query_len < 1:
            raise ConfigError(f"'query_len' must be >= 1 (got {self.query_len})")
        if self.context_len < 0:
            raise ConfigError(f"'context_len' must be >= 0 (got {self.context_len})")

    @property
    def is_decode(self) -> bool:
        return self.query_len == 1 and self.context_len > 0


@attrs.frozen
class Batch:
    """The requests of one step on one rank, in token order."""

    requests: tuple[Request, ...] = attrs.field(converter=tuple)
    _starts: tuple[int, ...] | None = attrs.field(default=None, init=False, eq=False, repr=False)
    _sums: tuple[list[int], list[int]] | None = attrs.field(default=None, init=False, eq=False,
                                                            repr=False)
    _codes: tuple[tuple[Request, ...], list[int]] | None = attrs.field(
        default=None, init=False, eq=False, repr=False)

    @classmethod
    def of(cls, lengths: Iterable[tuple[int, int]]) -> Batch:
        """From ``(query_len, context_len)`` pairs.

        Requests are immutable values, so equal pairs share one :class:`Request`: a batch of a
        million requests of a few lengths builds a few objects.
        """
        pairs = list(map(tuple, itertools.islice(lengths, MAX_REQUESTS + 1)))
        if len(pairs) > MAX_REQUESTS:
            raise ConfigError(f"a batch holds at most {MAX_REQUESTS} requests (got more)")
        made = {}
        for pair in set(pairs):
            if len(pair) != 2:
                raise ConfigError(f"a request is (query_len, context_len) (got {pair!r})")
            made[pair] = Request(*pair)
        return cls(tuple(map(made.__getitem__, pairs)))

    @classmethod
    def prefill(cls, tokens: int, requests: int = 1) -> Batch:
        """``requests`` fresh prompts sharing ``tokens`` evenly (the remainder on the first ones)."""
        _check_count(requests)
        if requests < 1 or tokens < requests:
            raise ConfigError(
                f"a prefill needs 1 <= requests <= tokens (got tokens={tokens}, requests={requests})"
            )
        base, extra = divmod(tokens, requests)
        return cls.of((base + (i < extra), 0) for i in range(requests))

    @classmethod
    def decode(cls, requests: int, context: int) -> Batch:
        """``requests`` decode requests, one new token each after ``context`` cached tokens."""
        if requests < 1:
            raise ConfigError(f"'requests' must be >= 1 (got {requests})")
        _check_count(requests)
        return cls.of([(1, context)] * requests)

    @property
    def tokens(self) -> int:
        return self.starts()[-1]

    def prefix_sums(self) -> tuple[list[int], list[int]]:
        """Running sums over the requests of their :class:`Shape` ``context`` and ``pairs``
        (index ``i``: requests before ``i``), so a range of whole requests costs O(1)."""
        if self._sums is None:
            uniques, codes = self.codes()
            context = [r.context_len + r.query_len for r in uniques]
            pairs = [r.query_len * r.context_len + r.query_len * (r.query_len + 1) // 2
                     for r in uniques]
            object.__setattr__(self, "_sums", (
                list(itertools.accumulate(map(context.__getitem__, codes), initial=0)),
                list(itertools.accumulate(map(pairs.__getitem__, codes), initial=0))))
        return self._sums

    def codes(self) -> tuple[tuple[Request, ...], list[int]]:
        """(the distinct request objects, each request's index among them): per-request work
        is done once per distinct object (:meth:`of` shares equal requests). Computed once."""
        if self._codes is None:
            index = dict.fromkeys(map(id, self.requests))
            for i, key in enumerate(index):
                index[key] = i
            uniques = tuple(dict(zip(map(id, self.requests), self.requests)).values())
            object.__setattr__(self, "_codes", (uniques, list(map(index.__getitem__,
                                                                  map(id, self.requests)))))
        return self._codes

    def starts(self) -> tuple[int, ...]:
        """Token offset of each request, then the total: ``starts()[i]`` is where request ``i``
        begins. Computed once (the batch never changes)."""
        if self._starts is None:
            lengths = map(operator.attrgetter("query_len"), self.requests)
            object.__setattr__(self, "_starts", tuple(itertools.accumulate(lengths, initial=0)))
        return self._starts

    @property
    def shape(self) -> Shape:
        return Shape.of_requests((r.query_len, r.context_len) for r in self.requests)

    def __len__(self) -> int:
        return len(self.requests)
