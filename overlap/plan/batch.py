"""A step's batch: per-request query and context lengths.

Prefill, decode and mixed (chunked-prefill) batches are all lists of requests, each computing
``query_len`` new tokens after ``context_len`` tokens already in its KV cache. Tokens are laid
out request after request, which is the order every microbatch split preserves.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from overlap.errors import ConfigError
from overlap.ops_graph.shape import Shape


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

    @classmethod
    def of(cls, lengths: Iterable[tuple[int, int]]) -> Batch:
        """From ``(query_len, context_len)`` pairs."""
        return cls(tuple(Request(q, c) for q, c in lengths))

    @classmethod
    def prefill(cls, tokens: int, requests: int = 1) -> Batch:
        """``requests`` fresh prompts sharing ``tokens`` evenly (the remainder on the first ones)."""
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
        return cls.of([(1, context)] * requests)

    @property
    def tokens(self) -> int:
        return sum(r.query_len for r in self.requests)

    @property
    def shape(self) -> Shape:
        return Shape.of_requests((r.query_len, r.context_len) for r in self.requests)

    def __len__(self) -> int:
        return len(self.requests)
