"""``auto``: search the schedule space under the simulator and keep the fastest plan.

Every named strategy is one hand-written point of a larger space. ``search`` walks that space —
microbatch count (1..4), where the batch is cut (token- or cost-balanced, or skewed around the
balanced point), the attention grain (a graph property: see *graph variants* below), the op
order (the named stage patterns generalised to N microbatches plus generated variants: where
the shared experts go, where the microbatches switch, how much of the tail is deferred into
the next layer with ``delta=1`` entries) and the stream assignment (MLA vector work on a
second compute stream) — and scores each point with the simulator on a hardware preset.

Why it is fast enough to run per batch shape: a plan is periodic in the layers, so candidates
are scored on two and one copies of the steady-state (last) layer, and the full step time is
extrapolated as ``T2 + (c - 2) * (T2 - T1)`` for its ``c`` copies, plus one simulated layer per
copy of any other layer kind (a model of at most 8 layers is scored whole).
Only the winner and the named strategies nearest the top are built and simulated at full depth,
and the fastest of those is returned: ``auto`` does not return a plan the simulator rates slower
than those named strategies (the benchmark checks every named one).

Graph variants: the attention grain changes the graph, not the plan, so the search accepts an
optional ``graphs`` factory ``attention -> ModelGraph`` (``templates_graphs`` makes one from
a template). Without it, the model's own grain is searched.

The search is a staged coordinate descent, not an exhaustive product (which would be ~10^3
simulations): order x count on balanced cuts, then cut points for the best few, then the
graph grain and the vector stream for the best one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import attrs

from overlap.cost.hardware import Hardware, get_hardware
from overlap.errors import ConfigError, OverlapError
from overlap.ops_graph.graph import ModelGraph
from overlap.ops_graph.op import OpKind, Role
from overlap.plan.batch import Batch
from overlap.plan.plan import Plan
from overlap.plan.split import Split, _micro, split, whole
from overlap.plan.stages import STAGES, stages
from overlap.plan.strategies.engine import Entry, build, with_vector_stream
from overlap.plan.validate import validate

DEFAULT_HARDWARE = "910b2"
MICRO_COUNTS = (1, 2, 3, 4)
SKEWS = (-0.1, -0.05, 0.05, 0.1)  # first-microbatch share offsets tried around the balanced cut
SHORT_MODEL = 8  # layers: a model this short is scored whole, not extrapolated
NATURAL_GRAIN = {"deepseek_decode": "two_stage", "ascend_multistream_mla": "fine"}
Scorer = Callable[[Plan, Hardware], float]
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
    """

    n: int
    order: str
    pattern: tuple[Entry, ...] = ()
    shares: tuple[float, ...] = ()
    balance: str = "tokens"
    attention: str = ""
    vector: bool = False
    named: str = ""

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
        return " ".join(parts)


@attrs.frozen
class SearchResult:
    """What ``search`` found: the plan, its simulated step time and what it was measured against."""

    plan: Plan
    step_s: float
    choice: Choice
    baseline: str  # the best named strategy (and its grain, if not the model's own)
    baseline_s: float
    evaluated: int  # candidates scored
    elapsed_s: float

    @property
    def speedup(self) -> float:
        """Baseline step time over ours (>= 1: auto never loses)."""
        return self.baseline_s / self.step_s if self.step_s > 0 else 1.0


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
    return Split(batch, tuple(_micro(batch, i, a, b) for i, (a, b) in enumerate(bounds)))


def split_of(choice: Choice, batch: Batch, cost: Callable | None = None) -> Split:
    """The microbatches ``choice`` cuts ``batch`` into (``cost`` for cost-balanced cuts)."""
    if choice.named:
        return split(batch, 2, split_requests=True)
    if choice.n == 1:
        return whole(batch)
    if choice.shares:
        return split_at(batch, choice.shares)
    return split(batch, choice.n, balance=choice.balance, cost=cost, split_requests=True)


def realise(choice: Choice, model: ModelGraph, batch: Batch, *, cost: Callable | None = None,
            check: bool = True, part: Split | None = None) -> Plan:
    """The plan ``choice`` describes for ``batch`` on ``model`` (already of the chosen grain);
    ``part``: the split when already made by :func:`split_of`."""
    from overlap.plan.strategies import build_plan

    part = part or split_of(choice, batch, cost)
    if choice.named:
        plan = build_plan(choice.named, model, part, multistream_mla=choice.vector, check=check)
        return attrs.evolve(plan, strategy="auto", options={**plan.options, "choice": choice.describe()})
    if part.n != choice.n:
        raise OverlapError(f"cannot cut {batch.tokens} tokens into {choice.n} microbatches")
    vec = choice.vector and any(op.role == Role.MLA_VECTOR for g in model.distinct() for op in g)
    plan = build("auto", model, part, choice.pattern, options={"choice": choice.describe()})
    if vec:
        plan = with_vector_stream(plan)
    return validate(plan) if check else plan


def steady_layers(model: ModelGraph, count: int) -> ModelGraph:
    """``count`` copies of ``model``'s last layer graph (the steady state: DeepSeek's first
    layers are dense, the other 58 MoE), in small."""
    return ModelGraph(model.name, [model.layers[-1]] * count)


def templates_graphs(model: str, parallel=None, *, phase: str = "prefill", dtype: str = "bf16",
                     num_layers: int | None = None) -> GraphFactory:
    """A graph factory over the templates: ``attention grain -> ModelGraph`` (memoised)."""
    from overlap.ops_graph.templates import build_model

    built: dict[str, ModelGraph] = {}

    def graphs(attention: str) -> ModelGraph:
        if attention not in built:
            built[attention] = build_model(model, parallel, phase=phase, attention=attention,
                                           dtype=dtype, num_layers=num_layers)
        return built[attention]

    return graphs


# -- scoring -----------------------------------------------------------------------------------


def simulated(comm_mode: str = "normal") -> Scorer:
    """The default scorer: the simulator's predicted step time with collectives in ``comm_mode``."""
    from overlap.backends.simulated import simulate

    def step_s(plan: Plan, hardware: Hardware) -> float:
        return simulate(plan, hardware, comm_mode=comm_mode).makespan

    return step_s


class _Evaluator:
    """Scores choices on small models extrapolated to the full depth, counting what it scored.

    The steady-state layer (the last one) is simulated twice and once: ``T2 + (c - 2) * (T2 - T1)``
    for its ``c`` copies (the plan is periodic); every other distinct layer (DeepSeek's dense
    ones) adds its one-layer time per copy. A model of at most 8 layers is simulated whole.
    """

    def __init__(self, graphs: GraphFactory, batch: Batch, hw: Hardware, score: Scorer,
                 progress: _Progress) -> None:
        self.graphs, self.batch, self.hw, self.score = graphs, batch, hw, score
        self.progress = progress
        self.count = 0
        self._proxies: dict[str, tuple[ModelGraph, ModelGraph | None, int, list]] = {}
        self._splits: dict[tuple, Split] = {}
        self._cost = _cost_fn(graphs(""), hw)

    def proxies(self, attention: str) -> tuple[ModelGraph, ModelGraph | None, int, list]:
        """(two-layer proxy, one-layer proxy, steady copies, [(other one-layer model, copies)]);
        a short model is its own proxy."""
        if attention not in self._proxies:
            full = self.graphs(attention)
            last = full.layers[-1]
            # A layer whose outputs cannot feed a copy of itself has no repeating steady state.
            if len(full) <= SHORT_MODEL or len(last.outputs) != len(last.inputs):
                self._proxies[attention] = (full, None, 0, [])
            else:
                others = [(ModelGraph(full.name, [g]), sum(x is g for x in full.layers))
                          for g in full.distinct() if g is not last]
                self._proxies[attention] = (steady_layers(full, 2), steady_layers(full, 1),
                                            sum(x is last for x in full.layers), others)
        return self._proxies[attention]

    def split(self, choice: Choice) -> Split:
        """``split_of(choice)``, made once per distinct cut (splitting a big batch is slow)."""
        key = ("named",) if choice.named else (choice.n, choice.shares, choice.balance)
        if key not in self._splits:
            self._splits[key] = split_of(choice, self.batch, self._cost)
        return self._splits[key]

    def __call__(self, choice: Choice) -> float:
        """Estimated full-depth step time (inf when the choice does not fit the batch)."""
        self.count += 1
        self.progress.tick(self.count)
        two, one, copies, others = self.proxies(choice.attention)
        try:
            part = self.split(choice)

            def time_of(model: ModelGraph) -> float:
                return self.score(realise(choice, model, self.batch, part=part, check=False), self.hw)

            t2 = time_of(two)
            if one is None:
                return t2
            t1 = time_of(one)
            rest = sum(count * time_of(model) for model, count in others)
        except OverlapError:  # a pattern the graph cannot order, or a batch it cannot cut
            return float("inf")
        return t2 + (copies - 2) * (t2 - t1) + rest

    def full(self, choice: Choice) -> tuple[Plan, float]:
        """The validated full-depth plan and its simulated step time (inf if it is invalid)."""
        try:
            plan = realise(choice, self.graphs(choice.attention), self.batch, part=self.split(choice))
        except OverlapError:
            return None, float("inf")  # type: ignore[return-value]
        return plan, self.score(plan, self.hw)


def _cost_fn(model: ModelGraph, hw: Hardware) -> Callable:
    """Microbatch cost for cost-balanced cuts: the roofline time of the last layer's compute."""
    from overlap.cost.roofline import op_time

    graph = model.layers[-1]
    ops = [op for op in graph if op.kind is OpKind.COMPUTE]

    memo: dict = {}  # a batch of like requests asks for the same shape many times

    def cost(shape) -> float:
        if shape not in memo:
            memo[shape] = sum(op_time(op.cost(shape), hw).total_s for op in ops)
        return memo[shape]

    return cost


class _Progress:
    """A one-line progress count on stderr, shown only on a terminal once the search is slow."""

    def __init__(self, enabled: bool, after_s: float = 0.5) -> None:
        self.enabled, self.after_s, self.start, self.shown = enabled, after_s, time.perf_counter(), False

    def tick(self, count: int) -> None:
        if self.enabled and time.perf_counter() - self.start > self.after_s:
            sys.stderr.write(f"\rauto: {count} candidates scored")
            self.shown = True

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


# -- the search --------------------------------------------------------------------------------


def search(model: ModelGraph, batch: Batch, hardware: str | Hardware = DEFAULT_HARDWARE, *,
           graphs: GraphFactory | None = None, attention: str = "", comm_mode: str = "normal",
           micro_counts: Iterable[int] = MICRO_COUNTS, score: Scorer | None = None,
           top: int = 3, progress: bool | None = None) -> SearchResult:
    """Search the schedule space for ``batch`` on ``model`` and return the fastest plan found.

    hardware:     preset name or :class:`Hardware` the simulator scores on.
    graphs:       ``attention grain -> ModelGraph`` to also search the grain (e.g.
                  :func:`templates_graphs`); ``attention`` names ``model``'s own grain.
    comm_mode:    ``normal`` or ``low_latency`` (DeepEP-style all-to-all, for decode).
    micro_counts: the microbatch counts to try (pin one when data-parallel ranks must agree).
    score:        ``(plan, hardware) -> seconds``; the simulator's step time by default.
    top:          how many (count, order) pairs get their cut points refined.
    progress:     show progress on stderr; by default only on a terminal.
    """
    start = time.perf_counter()
    hw = get_hardware(hardware)
    counts = _check_counts(micro_counts)
    if not isinstance(batch, Batch):
        raise ConfigError(f"'batch' must be a Batch (got {type(batch).__name__})")
    if top < 1:
        raise ConfigError(f"'top' must be >= 1 (got {top})")
    def factory(grain: str) -> ModelGraph:
        return model if graphs is None or grain in ("", attention) else graphs(grain)

    show = sys.stderr.isatty() if progress is None else progress
    ev = _Evaluator(factory, batch, hw, score or simulated(comm_mode), _Progress(show))

    named_scores = {c: ev(c) for c in _named(graphs is not None)}
    present = _present(model)
    scored: dict[Choice, float] = {}
    first = 2 if 2 in counts else counts[0]
    for c in _distinct(_orders_as_choices(first, present), present, model):
        scored[c] = ev(c)
    lead = sorted(scored, key=scored.get)[:top]
    for n in counts:
        if n != first:  # the best orders, generalised to the other microbatch counts
            for c in _orders_as_choices(n, present):
                if c.order in {b.order for b in lead} or n == 1:
                    scored[c] = ev(c)
    for c in sorted(scored, key=scored.get)[:top]:
        for v in _cut_variants(c):
            scored[v] = ev(v)
    best = min(scored, key=scored.get)
    for v in _graph_variants(best, graphs, attention):
        scored[v] = ev(v)
    best = min(scored, key=scored.get)

    result = _verify(ev, best, named_scores)
    ev.progress.done()
    return attrs.evolve(result, evaluated=ev.count, elapsed_s=time.perf_counter() - start)


def _verify(ev: _Evaluator, best: Choice, named_scores: dict[Choice, float]) -> SearchResult:
    """Full-depth simulation of the winner and of the best named strategies (those within 1%
    of the best estimate, at most two distinct estimates): the fastest is returned."""
    floor = min(named_scores.values())
    finalists: list[Choice] = []
    for c in sorted(named_scores, key=named_scores.get):
        s = named_scores[c]
        if s <= floor * 1.01 and all(s != named_scores[f] for f in finalists):
            finalists.append(c)
    finalists = finalists[:2]
    full = {c: ev.full(c) for c in dict.fromkeys([best, *finalists])}
    base = min(finalists, key=lambda c: full[c][1])
    win = min(full, key=lambda c: (full[c][1], c is not best))
    plan, step_s = full[win]
    return SearchResult(plan, step_s, win, base.describe().removeprefix("named "), full[base][1],
                        0, 0.0)


def _orders_as_choices(n: int, present: Sequence[str]) -> list[Choice]:
    return [Choice(n, name, pattern) for name, pattern in orders(n, present)]


def _present(model: ModelGraph) -> list[str]:
    found = {s for g in model.distinct() for s, ops in stages(g).items() if ops}
    return [s for s in STAGES if s in found]


def _distinct(choices: list[Choice], present: Sequence[str], model: ModelGraph) -> list[Choice]:
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


def _named(grains: bool) -> list[Choice]:
    """Every named strategy as a candidate; with a graph factory, each on the grain it was
    written for (DeepSeek's decode pipeline on two-stage attention, multistream MLA on fine)."""
    from overlap.plan.strategies import STRATEGIES

    out = [Choice(1 if n in ("sequential", "ascend_multistream_mla") else 2, n, named=n)
           for n in STRATEGIES if n != "auto"]
    if grains:
        out += [attrs.evolve(c, attention=NATURAL_GRAIN[c.named]) for c in out
                if c.named in NATURAL_GRAIN]
    return out


def _cut_variants(c: Choice) -> list[Choice]:
    out = [attrs.evolve(c, balance="cost")]
    if c.n == 2:
        out += [attrs.evolve(c, shares=(0.5 + s,)) for s in SKEWS]
    elif c.n > 2:
        for s in SKEWS[1:3]:  # a smaller or larger first microbatch, the rest equal
            first = 1 / c.n + s
            rest = (1 - first) / (c.n - 1)
            out.append(attrs.evolve(c, shares=tuple(first + rest * k for k in range(c.n - 1))))
    return out


def _graph_variants(c: Choice, graphs: GraphFactory | None, own: str) -> list[Choice]:
    out = [attrs.evolve(c, vector=True)]
    if graphs is not None:
        from overlap.ops_graph.templates import ATTENTION_GRAINS

        for grain in ATTENTION_GRAINS:
            if grain != (own or "one"):
                out.append(attrs.evolve(c, attention=grain))
                if grain == "fine":
                    out.append(attrs.evolve(c, attention=grain, vector=True))
    return out


def _check_counts(counts: Iterable[int]) -> tuple[int, ...]:
    out = tuple(counts)
    bad = [n for n in out if not (isinstance(n, int) and 1 <= n <= max(MICRO_COUNTS))]
    if not out or bad:
        raise ConfigError(f"'micro_counts' must be a non-empty subset of "
                          f"{', '.join(map(str, MICRO_COUNTS))} (got {out!r})")
    return out


def auto(model: ModelGraph, split: Split) -> Plan:
    """The registry form: search ``split.batch`` on the default hardware (:data:`DEFAULT_HARDWARE`).

    The microbatch count is searched; a split that was refused (one microbatch with a reason,
    e.g. after data-parallel agreement) pins it to 1. For the graph grain, other hardware or a
    cache, use :func:`search` or :class:`overlap.plan.cache.Planner`.
    """
    counts = (1,) if split.n == 1 and split.reason else MICRO_COUNTS
    return search(model, split.batch, micro_counts=counts, progress=False).plan
