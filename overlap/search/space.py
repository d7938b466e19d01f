"""The search space: every point a :class:`Choice`, and how a choice becomes a plan.

Every named strategy is one hand-written point of a larger space: microbatch count (1..4), where
the batch is cut (token- or cost-balanced, or skewed around the balanced point), the attention
grain (a graph property), the op order (the named stage patterns generalised to N microbatches
plus generated variants: where the shared experts go, where the microbatches switch, how much of
the tail is deferred into the next layer with ``delta=1`` entries) and the stream assignment
(MLA vector work on a second compute stream). A choice is small and hashable: the plan cache
stores choices and :func:`realise` rebuilds a plan from one for any batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import attrs

from overlap.errors import OverlapError
from overlap.ops_graph.graph import ModelGraph
from overlap.ops_graph.op import OpKind, Role
from overlap.plan.batch import Batch
from overlap.plan.plan import Plan
from overlap.plan.split import Split, micro_batch, split, whole
from overlap.plan.stages import STAGES, stages
from overlap.plan.strategies import NAMED, STRATEGIES, build_plan
from overlap.plan.strategies.chunked import chunked, uncuttable
from overlap.plan.strategies.engine import Entry, build, with_vector_stream
from overlap.plan.validate import validate

MICRO_COUNTS = (1, 2, 3, 4)
CHUNK_COUNTS = (2, 4, 8)  # chunks of experts tried for one-microbatch plans
SKEWS = (-0.1, -0.05, 0.05, 0.1)  # first-microbatch share offsets tried around the balanced cut
GraphFactory = Callable[[str], ModelGraph]

# Per-microbatch stage sequences: where the shared experts run.
_SEQUENCES = {
    "shared_after_dispatch": ("attn0", "attn1", "tp_attn", "gate", "dispatch", "shared",
                              "experts", "combine", "merge", "tp_ffn"),
    "shared_before_combine": STAGES,
    "shared_after_combine": ("attn0", "attn1", "tp_attn", "gate", "dispatch", "experts",
                             "combine", "shared", "merge", "tp_ffn"),
}
_COMMS = ("tp_attn", "dispatch", "combine", "tp_ffn")
_ATTN = ("attn0", "attn1", "tp_attn", "gate")
_TAIL = ("merge", "tp_ffn")


@attrs.frozen
class Choice:
    """One point of the search space: all it takes to rebuild the plan for another batch.

    n:         microbatch count.
    shares:    first n-1 cut points as fractions of the tokens; () means balanced by ``balance``.
    balance:   ``tokens`` or ``cost`` (the balanced cut when ``shares`` is empty).
    attention: the graph grain, or "" for the model as given.
    order:     the name of the stage pattern; ``pattern`` its entries.
    vector:    MLA vector ops on a second compute stream.
    named:     the named strategy this is, if any (then ``pattern`` is unused).
    chunks:    one microbatch only: the MoE chain cut into this many chunks of experts
               (``plan.strategies.chunked``); ``chunk_dispatch`` cuts the dispatch too (rounds).
    """

    n: int
    order: str
    pattern: tuple[Entry, ...] = ()
    shares: tuple[float, ...] = ()
    balance: str = "tokens"
    attention: str = ""
    vector: bool = False
    named: str = ""
    chunks: int = 1
    chunk_dispatch: bool = False

    def describe(self) -> str:
        """A one-line summary, e.g. ``n=2 deferred2/shared_after_combine cut=0.45 attn=two_stage``."""
        if self.named:
            return f"named {self.named}" + (f" attn={self.attention}" if self.attention else "")
        cut = (f"cut={','.join(f'{s:.2f}' for s in self.shares)}" if self.shares
               else f"{self.balance}-balanced")
        parts = [f"n={self.n}", self.order, cut]
        if self.attention:
            parts.append(f"attn={self.attention}")
        if self.vector:
            parts.append("vector-stream")
        if self.chunks > 1:
            parts.append(f"{'rounds' if self.chunk_dispatch else 'combine-chunks'}={self.chunks}")
        return " ".join(parts)


# -- the space ---------------------------------------------------------------------------------


def orders(n: int, present: Sequence[str] = STAGES) -> Iterator[tuple[str, tuple[Entry, ...]]]:
    """Every generated stage pattern for ``n`` microbatches over the ``present`` stages, by name.

    Two families, each over three per-microbatch sequences (where the shared experts run):

    - ``pingpong``: the sequence cut into groups (switch microbatch after every stage, or only
      after launching a collective), issued group by group across microbatches; then the last
      microbatch's final ``d`` groups are deferred into the next layer slot (``delta=1``), just
      after microbatch 0's head (ascend_dbo, sglang_tbo and vllm_dbo are ``d=0`` members);
    - ``stagger``: microbatch ``m`` runs ``m * lag`` stages behind microbatch 0, its overflow
      wrapping into the next slot;

    and DeepSeek's prefill and decode pipelines generalised to ``n`` microbatches (for n=2
    exactly the named ``deepseek_prefill`` and ``deepseek_decode`` patterns).

    Stages absent from the graphs go last; they hold no ops.
    """
    if n == 1:  # no split: only the single batch's own comm can overlap (e.g. shared experts)
        for seq_name, seq in _SEQUENCES.items():
            yield f"in_order/{seq_name}", tuple((0, 0, s) for s in seq)
        return
    yield "deepseek_prefill_n", _deepseek_prefill(n)
    yield "deepseek_decode_n", _deepseek_decode(n)
    for seq_name, seq in _SEQUENCES.items():
        units = _units(seq, present)
        for cut in ("per_stage", "per_comm"):
            groups = units if cut == "per_stage" else _per_comm(units, present)
            base = [(0, m, s) for g in groups for m in range(n) for s in g]
            for d in range(min(4, len(groups) - 1) + 1):
                yield f"pingpong/{cut}/{seq_name}/defer{d}", _defer(base, groups, n, d)
        for lag in range(1, len(units)):
            if (n - 1) * lag < len(units):
                yield f"stagger/{seq_name}/lag{lag}", _stagger(units, n, lag)


def _units(seq: Sequence[str], present: Sequence[str]) -> list[tuple[str, ...]]:
    """``seq`` as units of one present stage each, absent stages riding with the next one
    (so every microbatch takes even the empty stages in one order, as the engine requires)."""
    units: list[list[str]] = []
    pending: list[str] = []
    for s in seq:
        pending.append(s)
        if s in present:
            units.append(pending)
            pending = []
    if not units:
        return [tuple(pending)]
    units[-1] += pending
    return [tuple(u) for u in units]


def _per_comm(units: list[tuple[str, ...]], present: Sequence[str]) -> list[tuple[str, ...]]:
    """Units merged into groups that each end with a collective launch."""
    out: list[tuple[str, ...]] = []
    cur: list[str] = []
    for u in units:
        cur += u
        if any(s in _COMMS and s in present for s in u):
            out.append(tuple(cur))
            cur = []
    if cur:
        out.append(tuple(cur))
    return out


def _deepseek_prefill(n: int) -> tuple[Entry, ...]:
    """Attention and dispatch of each microbatch in turn — the last one's shared experts and
    tail (previous layer) after microbatch 0's — then experts and combine of each, then the
    other microbatches' shared experts and tails."""
    last = n - 1
    out: list[Entry] = []
    for m in range(n):
        out += [*[(0, m, s) for s in _ATTN], (0, m, "dispatch")]
        if m == 0:
            out += [(1, last, s) for s in ("shared", *_TAIL)]
    for m in range(n):
        out += [(0, m, "experts"), (0, m, "combine")]
    for m in range(last):
        out += [(0, m, s) for s in ("shared", *_TAIL)]
    return tuple(out)


def _deepseek_decode(n: int) -> tuple[Entry, ...]:
    """Microbatch m's ATTN-0 beside microbatch m-1's experts and combine (the last one's from
    the previous layer), then m's ATTN-1, dispatch and shared experts, then m-1's tail."""
    out: list[Entry] = []
    for m in range(n):
        prev, delta = (m - 1, 0) if m else (n - 1, 1)
        out += [(0, m, "attn0"), (delta, prev, "experts"), (delta, prev, "combine"),
                *[(0, m, s) for s in _ATTN[1:]], (0, m, "dispatch"), (0, m, "shared"),
                *[(delta, prev, s) for s in _TAIL]]
    return tuple(out)


def _defer(base: list[Entry], groups: list[tuple[str, ...]], n: int, d: int) -> tuple[Entry, ...]:
    """Move the last microbatch's final ``d`` groups into the next slot, after microbatch 0's
    head and before that microbatch's own head (which reads their result)."""
    if d == 0:
        return tuple(base)
    tail = {s for g in groups[-d:] for s in g}
    last = n - 1
    moved = [(1, m, s) for _, m, s in base if m == last and s in tail]
    kept = [e for e in base if not (e[1] == last and e[2] in tail)]
    head = len(groups[0])
    out, rest = kept[:head], kept[head:]
    while moved:  # interleave one deferred entry with one entry of this layer
        out.append(moved.pop(0))
        if rest and rest[0][1] != last:
            out.append(rest.pop(0))
    return tuple(out + rest)


def _stagger(units: Sequence[tuple[str, ...]], n: int, lag: int) -> tuple[Entry, ...]:
    p = len(units)
    items = [((i + m * lag) % p, m, (i + m * lag) // p, u)
             for m in range(n) for i, u in enumerate(units)]
    items.sort(key=lambda it: (it[0], -it[2], it[1]))  # the older layer first at a position
    return tuple((delta, m, s) for _, m, delta, u in items for s in u)


# -- building plans ----------------------------------------------------------------------------


def split_at(batch: Batch, shares: Sequence[float]) -> Split:
    """``batch`` cut at the given token fractions (each cut kept inside ``1..tokens-1``)."""
    total = batch.tokens
    cuts: list[int] = []
    for share in shares:
        lo = cuts[-1] + 1 if cuts else 1
        cuts.append(max(lo, min(total - (len(shares) - len(cuts)), round(share * total))))
    bounds = list(zip([0, *cuts], [*cuts, total]))
    return Split(batch, tuple(micro_batch(batch, i, a, b) for i, (a, b) in enumerate(bounds)))


def split_of(choice: Choice, batch: Batch, cost: Callable | None = None) -> Split:
    """The microbatches ``choice`` cuts ``batch`` into (``cost`` for cost-balanced cuts)."""
    if choice.named and STRATEGIES[choice.named].microbatches > 1:
        return split(batch, 2, split_requests=True)
    if choice.n == 1 or choice.named:  # one-microbatch strategies use only the whole batch
        return whole(batch)
    if choice.shares:
        return split_at(batch, choice.shares)
    return split(batch, choice.n, balance=choice.balance, cost=cost, split_requests=True)


def realise(choice: Choice, model: ModelGraph, batch: Batch, *, cost: Callable | None = None,
            check: bool = True, part: Split | None = None) -> Plan:
    """The plan ``choice`` describes for ``batch`` on ``model`` (already of the chosen grain);
    ``part``: the split when already made by :func:`split_of`."""
    part = part or split_of(choice, batch, cost)
    if choice.named:
        plan = build_plan(choice.named, model, part, multistream_mla=choice.vector, check=check)
        return attrs.evolve(plan, strategy="auto", options={**plan.options, "choice": choice.describe()})
    if part.n != choice.n:
        raise OverlapError(f"cannot cut {batch.tokens} tokens into {choice.n} microbatches")
    vec = choice.vector and any(op.role == Role.MLA_VECTOR for g in model.distinct() for op in g)
    options = {"choice": choice.describe()}
    if choice.chunks > 1:
        if why := uncuttable(model):
            raise OverlapError(f"cannot chunk the MoE: {why}")
        model, _ = chunked(model, choice.chunks, dispatch=choice.chunk_dispatch)  # dense: as is
        options["chunks"] = choice.chunks
    plan = build("auto", model, part, choice.pattern, options=options)
    if vec:
        plan = with_vector_stream(plan)
    return validate(plan) if check else plan


# -- neighbourhoods ----------------------------------------------------------------------------


def orders_as_choices(n: int, present: Sequence[str]) -> list[Choice]:
    """Every generated order for ``n`` microbatches; for one, also the chunked MoE forms
    (shared experts under the dispatch, the chain in 2, 4 or 8 chunks, dispatch cut or not)."""
    out = [Choice(n, name, pattern) for name, pattern in orders(n, present)]
    if n == 1 and {"dispatch", "experts", "combine"} <= set(present):
        out += [chunked_choice(r, d) for r in CHUNK_COUNTS for d in (False, True)]
    return out


def chunked_choice(chunks: int, dispatch: bool) -> Choice:
    """One microbatch, shared experts under the dispatch, the MoE chain in ``chunks`` chunks of
    experts (``dispatch``: the dispatch too, in rounds)."""
    pattern = tuple((0, 0, s) for s in _SEQUENCES["shared_after_dispatch"])
    return Choice(1, "in_order/shared_after_dispatch", pattern, chunks=chunks,
                  chunk_dispatch=dispatch)


def present_stages(model: ModelGraph) -> list[str]:
    """The stages that hold ops in some layer of ``model``, in :data:`STAGES` order."""
    found = {s for g in model.distinct() for s, ops in stages(g).items() if ops}
    return [s for s in STAGES if s in found]


def distinct(choices: list[Choice], present: Sequence[str], model: ModelGraph) -> list[Choice]:
    """One choice per distinct pair of stream orders (compute stages, comm stages): patterns
    that differ only in how the host interleaves the two streams run alike."""
    comm = {s for g in model.distinct() for s, ops in stages(g).items()
            if any(g[o].kind is OpKind.COMM for o in ops)}
    seen, out = set(), []
    for c in choices:
        entries = [e for e in c.pattern if e[2] in present]
        key = (tuple(e for e in entries if e[2] in comm), tuple(e for e in entries if e[2] not in comm))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def named_choices(grains: bool) -> list[Choice]:
    """Every named strategy as a candidate; with a graph factory, each on the grain it was
    written for (DeepSeek's decode pipeline on two-stage attention, multistream MLA on fine)."""
    # ``off`` first: it ties with ``sequential`` (the same order) and is the explicit choice.
    out = [Choice(STRATEGIES[n].microbatches, n, named=n) for n in sorted(NAMED, key="off".__ne__)]
    if grains:
        out += [attrs.evolve(c, attention=STRATEGIES[c.named].grain) for c in out
                if STRATEGIES[c.named].grain != "one"]
    return out


def cut_variants(c: Choice) -> list[Choice]:
    """``c`` with a cost-balanced cut, and with the first microbatch a little smaller or larger."""
    out = [attrs.evolve(c, balance="cost")]
    if c.n == 2:
        out += [attrs.evolve(c, shares=(0.5 + s,)) for s in SKEWS]
    elif c.n > 2:
        for s in SKEWS[1:3]:  # a smaller or larger first microbatch, the rest equal
            first = 1 / c.n + s
            rest = (1 - first) / (c.n - 1)
            out.append(attrs.evolve(c, shares=tuple(first + rest * k for k in range(c.n - 1))))
    return out


def graph_variants(c: Choice, graphs: GraphFactory | None, own: str) -> list[Choice]:
    """``c`` with the vector stream, and (given a graph factory) on every other attention grain."""
    out = [attrs.evolve(c, vector=True)]
    if graphs is not None:
        from overlap.ops_graph.templates import ATTENTION_GRAINS

        for grain in ATTENTION_GRAINS:
            if grain != (own or "one"):
                out.append(attrs.evolve(c, attention=grain))
                if grain == "fine":
                    out.append(attrs.evolve(c, attention=grain, vector=True))
    return out


