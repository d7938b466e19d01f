"""Splitting a batch into microbatches.

A microbatch is a contiguous run of the batch's tokens: whole requests, plus at most one request
cut in two at each boundary when ``split_requests`` allows it (the second piece keeps its true
positions: its context grows by the first piece's length). Boundaries balance either tokens or
*cost* — attention work grows with context, so equal tokens is not equal work.

A split can be refused (too few tokens, too uneven); the result then has one microbatch and says
why. Across data-parallel ranks the count must agree, or one rank would issue collectives another
never matches: :func:`agree` takes the caller's all-reduce.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Sequence

import attrs

from overlap.errors import ConfigError, PlanError
from overlap.ops_graph.graph import Graph, ModelGraph
from overlap.ops_graph.shape import Shape
from overlap.plan.batch import Batch

BALANCES = ("tokens", "cost")
MAX_MICROBATCHES = 8


@attrs.frozen
class Piece:
    """Part of one request inside a microbatch: query tokens ``[start, start + length)``."""

    request: int
    start: int
    length: int
    context_len: int  # cached tokens before this piece (the request's context + earlier pieces)


@attrs.frozen
class MicroBatch:
    """One microbatch: its token range in the batch, its shape, and (on first use) its pieces.

    The pieces are derived from the batch when asked for, and the shape from the batch's
    prefix sums, so a microbatch of a million requests costs a few bisections, not a million
    objects (the search splits the same batch many times).
    """

    index: int
    token_start: int
    token_end: int
    shape: Shape
    batch: Batch = attrs.field(eq=False, repr=False)
    _pieces: tuple[Piece, ...] | None = attrs.field(default=None, init=False, eq=False, repr=False)

    @property
    def tokens(self) -> int:
        return self.token_end - self.token_start

    @property
    def pieces(self) -> tuple[Piece, ...]:
        """The parts of requests in this microbatch, in token order."""
        if self._pieces is None:
            object.__setattr__(self, "_pieces", _pieces(self.batch, self.token_start, self.token_end))
        return self._pieces

    @property
    def continues_request(self) -> bool:
        """Whether this microbatch's first piece continues a request cut by the previous one."""
        if self.token_end <= self.token_start:
            return False
        starts = self.batch.starts()
        return starts[bisect.bisect_right(starts, self.token_start) - 1] < self.token_start


@attrs.frozen
class Split:
    """The microbatches of a batch, and why the split is what it is."""

    batch: Batch
    micro: tuple[MicroBatch, ...] = attrs.field(converter=tuple)
    reason: str = ""

    def __attrs_post_init__(self) -> None:
        # A plan's microbatches must partition its batch: a gap, an overlap or an empty
        # microbatch would simulate (and run) the wrong tokens.
        total = self.batch.tokens
        if not self.batch.requests:
            raise PlanError("the batch is empty: a step needs at least one request")
        if not self.micro:
            raise PlanError(f"a split needs at least one microbatch (batch of {total} tokens)")
        end = 0
        for i, m in enumerate(self.micro):
            if m.index != i:
                raise PlanError(f"microbatch {i} has index {m.index}: indices must be 0..{self.n - 1}")
            if m.token_start != end or m.token_end <= m.token_start:
                raise PlanError(
                    f"microbatch {i} covers tokens {m.token_start}..{m.token_end} but must start "
                    f"at {end} and hold at least one token: microbatches must cover the batch's "
                    f"{total} tokens in order, without gaps or overlaps")
            if m.batch is not self.batch and m.batch != self.batch:
                raise PlanError(f"microbatch {i} is a part of another batch")
            end = m.token_end
        if end != total:
            raise PlanError(f"the microbatches cover tokens 0..{end} of a batch of {total}: "
                            "they must cover all of it")

    @property
    def n(self) -> int:
        return len(self.micro)

    @property
    def token_counts(self) -> tuple[int, ...]:
        return tuple(m.tokens for m in self.micro)

    def __str__(self) -> str:
        counts = " + ".join(str(c) for c in self.token_counts)
        return f"{self.n} microbatch{'es' if self.n > 1 else ''} ({counts} tokens)" + (
            f"; {self.reason}" if self.reason else "")


def _default_cost(shape: Shape) -> float:
    return float(shape.tokens)


def whole(batch: Batch, reason: str = "") -> Split:
    """The unsplit batch as a single microbatch."""
    return Split(batch, micro_batches(batch, [(0, batch.tokens)]), reason)


def unsplit(part: Split) -> Split:
    """``part``'s batch as one microbatch: ``part`` itself when it already is one (building the
    microbatch of a large batch is not free), else :func:`whole`."""
    return part if part.n == 1 and not part.reason else whole(part.batch)


def split(batch: Batch, n: int, *, balance: str = "tokens",
          cost: Callable[[Shape], float] | None = None, split_requests: bool = False,
          min_tokens: int = 1, max_imbalance: float = 1.0) -> Split:
    """Split ``batch`` into ``n`` microbatches, or refuse with a reason.

    balance:        ``tokens`` equalises token counts; ``cost`` equalises ``cost(shape)``
                    (by default the token count; pass e.g. a graph's total FLOPs).
    split_requests: allow cutting a request in two at a microbatch boundary.
    min_tokens:     refuse when a microbatch would have fewer tokens than this.
    max_imbalance:  refuse when (largest - smallest) / largest microbatch cost exceeds this.
    """
    if not 1 <= n <= MAX_MICROBATCHES:
        raise ConfigError(f"'n' must be in 1..{MAX_MICROBATCHES} (got {n})")
    if balance not in BALANCES:
        raise ConfigError(f"'balance' must be one of {', '.join(BALANCES)} (got {balance!r})")
    if min_tokens < 1:
        raise ConfigError(f"'min_tokens' must be >= 1 (got {min_tokens})")
    if not 0.0 <= max_imbalance <= 1.0:
        raise ConfigError(f"'max_imbalance' must be in [0, 1] (got {max_imbalance})")
    if n == 1:
        return whole(batch)
    measure = (cost or _default_cost) if balance == "cost" else _default_cost
    if not split_requests and len(batch) < n:
        return whole(batch, f"not split: {len(batch)} request(s) cannot fill {n} microbatches "
                            "without splitting a request")
    if batch.tokens < n * min_tokens:
        return whole(batch, f"not split: {batch.tokens} tokens < {n} x min_tokens {min_tokens}")
    cuts = _cuts(batch, n, measure, split_requests)
    bounds = zip([0, *cuts], [*cuts, batch.tokens])
    micro = micro_batches(batch, bounds)
    smallest = min(m.tokens for m in micro)
    if smallest < min_tokens:
        return whole(batch, f"not split: a microbatch would have {smallest} tokens "
                            f"(min_tokens {min_tokens})")
    costs = [measure(m.shape) for m in micro]
    imbalance = (max(costs) - min(costs)) / max(costs) if max(costs) > 0 else 0.0
    if imbalance > max_imbalance:
        return whole(batch, f"not split: imbalance {imbalance:.2f} > max_imbalance {max_imbalance}")
    return Split(batch, micro)


def _cuts(batch: Batch, n: int, measure: Callable[[Shape], float], split_requests: bool) -> list[int]:
    """Token positions of the n-1 boundaries, each as close as possible to an equal share.

    Without ``split_requests`` every cut is a request boundary (the batch has at least ``n``
    requests); with it a cut may move inside the request that straddles its share.
    """
    starts = batch.starts()
    # Cost of the first k whole requests. A large batch repeats few request shapes, so each
    # (query_len, context_len) is measured once: a million-request prefill stays fast.
    uniques, codes = batch.codes()
    by_shape: dict[tuple[int, int], float] = {}
    for r in uniques:
        pair = (r.query_len, r.context_len)
        if pair not in by_shape:
            by_shape[pair] = measure(Shape.of_requests([pair]))
    cost = [by_shape[r.query_len, r.context_len] for r in uniques]
    prefix = list(itertools.accumulate(map(cost.__getitem__, codes), initial=0.0))
    total = prefix[-1]
    cuts: list[int] = []
    last_index = 0  # request boundary index of the previous cut
    for k in range(1, n):
        target = total * k / n
        if split_requests:
            lo = cuts[-1] + 1 if cuts else 1  # keep microbatches non-empty and ordered
            hi = batch.tokens - (n - k)
            best = _nearest_boundary(starts, prefix, target, lo, hi)
            best = _inside_request(batch, starts, prefix, measure, target, lo, hi, best)
        else:
            first, final = last_index + 1, len(batch.requests) - (n - k)
            last_index = _closest(prefix, target, first, final)
            best = starts[last_index]
        cuts.append(best)
    return cuts


def _closest(prefix: Sequence[float], target: float, first: int, last: int) -> int:
    """The index in ``first..last`` whose ``prefix`` (non-decreasing) is closest to ``target``;
    the smallest such index on a tie. Bisection: a million-request batch is cut in microseconds."""
    j = bisect.bisect_left(prefix, target, first, last + 1)
    options = []
    if j <= last:
        options.append((abs(prefix[j] - target), j))
    if j > first:
        k = bisect.bisect_left(prefix, prefix[j - 1], first, j)  # leftmost with that value
        options.append((abs(prefix[k] - target), k))
    return min(options)[1]


def _nearest_boundary(starts: Sequence[int], prefix: Sequence[float], target: float, lo: int,
                      hi: int) -> int:
    first, last = bisect.bisect_left(starts, lo), bisect.bisect_right(starts, hi) - 1
    if first > last:  # every boundary is taken: cut inside a request, as close as allowed
        return max(lo, min(hi, round(lo + (hi - lo) / 2)))
    return starts[_closest(prefix, target, first, last)]


def _inside_request(batch: Batch, starts: list[int], prefix: list[float],
                    measure: Callable[[Shape], float], target: float, lo: int, hi: int,
                    best: int) -> int:
    """Move the cut inside the request that straddles ``target`` when that balances better."""
    # The requests with prefix[i] <= target <= prefix[i + 1], in order, start at the first i
    # whose end reaches the target.
    start = max(0, bisect.bisect_left(prefix, target, 1) - 1)
    for i in range(start, len(batch.requests)):
        r = batch.requests[i]
        if prefix[i] > target:
            break
        if not target <= prefix[i + 1] or r.query_len < 2:
            continue

        def cost_until(t: int, i: int = i, r=r) -> float:
            return prefix[i] + measure(Shape.of_requests([(t, r.context_len)])) if t else prefix[i]

        a, b = 1, r.query_len - 1  # first piece length: bisect for cost_until(t) ~ target
        while a < b:
            mid = (a + b) // 2
            if cost_until(mid) < target:
                a = mid + 1
            else:
                b = mid
        for t in (a - 1, a):
            pos = starts[i] + t
            if 0 < t < r.query_len and lo <= pos <= hi and (
                abs(cost_until(t) - target) < abs(_cost_at(best, starts, prefix, batch, measure) - target)
            ):
                best = pos
        break
    return best


def _cost_at(pos: int, starts: list[int], prefix: list[float], batch: Batch,
             measure: Callable[[Shape], float]) -> float:
    if not 0 <= pos < starts[-1]:
        return prefix[-1]
    i = bisect.bisect_right(starts, pos) - 1  # the request holding token ``pos``
    inside = pos - starts[i]
    extra = measure(Shape.of_requests([(inside, batch.requests[i].context_len)])) if inside else 0.0
    return prefix[i] + extra


def micro_batch(batch: Batch, index: int, start: int, end: int) -> MicroBatch:
    """Tokens ``start..end`` of ``batch`` (in request order) as microbatch ``index``."""
    return micro_batches(batch, [(start, end)], first=index)[0]


def micro_batches(batch: Batch, ranges: Iterable[tuple[int, int]], *,
                  first: int = 0) -> tuple[MicroBatch, ...]:
    """Microbatches ``first, first + 1, ...`` of the token ranges ``ranges``."""
    return tuple(MicroBatch(index, start, end, _shape(batch, start, end), batch)
                 for index, (start, end) in enumerate(ranges, start=first))


def _pieces(batch: Batch, start: int, end: int) -> tuple[Piece, ...]:
    starts, requests = batch.starts(), batch.requests
    out = []
    i = max(0, bisect.bisect_right(starts, start) - 1)
    while i < len(requests) and starts[i] < end:
        pos, r = starts[i], requests[i]
        a, b = max(start, pos), min(end, pos + r.query_len)
        if a < b:
            out.append(Piece(i, a - pos, b - a, r.context_len + (a - pos)))
        i += 1
    return tuple(out)


def _shape(batch: Batch, start: int, end: int) -> Shape:
    """:meth:`Shape.of_requests` of the pieces of tokens ``start..end``: the cut requests at
    either end explicitly, the whole ones between from the batch's prefix sums."""
    starts, requests = batch.starts(), batch.requests
    start, end = max(start, 0), min(end, starts[-1])
    if end <= start:
        return Shape(0)
    head = bisect.bisect_right(starts, start) - 1  # request holding the first token
    tail = bisect.bisect_right(starts, end - 1) - 1  # ... and the last
    context_sums, pair_sums = batch.prefix_sums()

    def piece(i: int, a: int, b: int) -> tuple[int, int]:  # (context, pairs) of tokens a..b of i
        length, cached = b - a, requests[i].context_len + (a - starts[i])
        return cached + length, length * cached + length * (length + 1) // 2

    if head == tail:
        context, pairs = piece(head, start, end)
        return Shape(end - start, 1, context, pairs)
    c1, p1 = piece(head, start, starts[head + 1])
    c2, p2 = piece(tail, starts[tail], end)
    context = c1 + c2 + context_sums[tail] - context_sums[head + 1]
    pairs = p1 + p2 + pair_sums[tail] - pair_sums[head + 1]
    return Shape(end - start, tail - head + 1, context, pairs)


def agree(local_n: int, all_reduce_min: Callable[[int], int]) -> int:
    """The microbatch count every data-parallel rank will use: the minimum of their wishes.

    ``all_reduce_min`` is the caller's collective (e.g. ``torch.distributed.all_reduce`` with
    ``ReduceOp.MIN`` on a one-element tensor); a rank that refused to split wishes 1, so no rank
    microbatches while another does not.
    """
    agreed = int(all_reduce_min(local_n))
    if not 1 <= agreed <= local_n:
        raise ConfigError(f"all_reduce_min returned {agreed}, outside 1..{local_n}: not a minimum")
    return agreed


def split_agreed(batch: Batch, n: int, all_reduce_min: Callable[[int], int], **options) -> Split:
    """Split locally, agree the count across ranks, and re-split to the agreed count.

    The agreed count is the minimum of every rank's local result, so it never exceeds what this
    rank could split into; the re-split drops the thresholds (another rank already accepted
    that count) and always yields exactly the agreed count.
    """
    local = split(batch, n, **options)
    agreed = agree(local.n, all_reduce_min)
    if agreed == local.n:
        return local
    if agreed == 1:
        return whole(batch, local.reason or "not split: another data-parallel rank refused")
    return split(batch, agreed, **{**options, "min_tokens": 1, "max_imbalance": 1.0})


def graph_cost(model: ModelGraph | Graph) -> Callable[[Shape], float]:
    """A cost function for ``balance="cost"``: the FLOPs (matrix + vector) of every layer of
    ``model`` for a microbatch shape, so attention's growth with context counts.

    Layers that share a graph are evaluated once and weighted by how often they occur.
    """
    layers = model.layers if isinstance(model, ModelGraph) else (model,)
    weight: dict[int, int] = {}
    graphs: dict[int, Graph] = {}
    for g in layers:
        weight[id(g)] = weight.get(id(g), 0) + 1
        graphs[id(g)] = g
    parts = [(weight[k], op.cost) for k, g in graphs.items() for op in g.ops]

    def cost(shape: Shape) -> float:
        return sum(w * (c.flops(shape) + c.vector_flops(shape)) for w, c in parts)

    return cost
