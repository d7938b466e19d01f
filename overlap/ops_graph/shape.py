"""The shape of a microbatch, as the cost formulas see it.

Op costs depend on more than the token count: attention work grows with how many earlier tokens
each query attends to. A :class:`Shape` keeps the four aggregate figures every cost formula in the
templates needs, so formulas stay plain weighted sums that serialise to JSON.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs


def _non_negative(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name!r} must be >= 0 (got {value})")


@attrs.frozen
class Shape:
    """Aggregate size of one microbatch on one rank.

    tokens:   query tokens computed in this step (prefill chunk tokens + one per decode request).
    requests: requests (sequences) the tokens belong to.
    context:  key/value tokens read by attention, summed over requests (earlier + new tokens).
    pairs:    causal query-key pairs attention scores, summed over requests.
    """

    tokens: int = attrs.field(validator=_non_negative)
    requests: int = attrs.field(default=0, validator=_non_negative)
    context: int = attrs.field(default=0, validator=_non_negative)
    pairs: int = attrs.field(default=0, validator=_non_negative)

    @classmethod
    def of_requests(cls, lengths: Iterable[tuple[int, int]]) -> Shape:
        """Shape of requests given as ``(query_len, context_len)`` pairs.

        ``context_len`` counts the tokens already in the KV cache before this step; a fresh
        prefill has 0, a decode step has the sequence length so far and ``query_len`` 1.
        """
        tokens = requests = context = pairs = 0
        for query_len, context_len in lengths:
            if query_len < 1 or context_len < 0:
                raise ValueError(
                    "each request needs query_len >= 1 and context_len >= 0 "
                    f"(got query_len={query_len}, context_len={context_len})"
                )
            tokens += query_len
            requests += 1
            context += context_len + query_len
            # query i (0-based) sees the context plus queries 0..i.
            pairs += query_len * context_len + query_len * (query_len + 1) // 2
        return cls(tokens=tokens, requests=requests, context=context, pairs=pairs)

    @classmethod
    def prefill(cls, tokens: int, requests: int = 1) -> Shape:
        """``requests`` fresh prompts sharing ``tokens`` evenly (the remainder on the first)."""
        if requests < 1 or tokens < requests:
            raise ValueError(f"need 1 <= requests <= tokens (got tokens={tokens}, requests={requests})")
        base, extra = divmod(tokens, requests)
        return cls.of_requests([(base + (1 if i < extra else 0), 0) for i in range(requests)])

    @classmethod
    def decode(cls, requests: int, context: int) -> Shape:
        """``requests`` decode requests, each one new token after ``context`` cached tokens."""
        return cls.of_requests([(1, context)] * requests)

    def __add__(self, other: Shape) -> Shape:
        return Shape(
            tokens=self.tokens + other.tokens,
            requests=self.requests + other.requests,
            context=self.context + other.context,
            pairs=self.pairs + other.pairs,
        )
