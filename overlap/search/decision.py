"""The per-step decision: which plan a step runs, overlap ``off`` included, the same on every rank.

A serving engine asks once per step. The answer depends on the batch only through its bucket
(:class:`~overlap.search.planner.ShapeKey`), so it is computed once per bucket and then looked
up; the lookup is the hot path (a tuple and one dictionary access).

Data-parallel agreement. Ranks run different local batches but must issue the same collectives,
so they must all pick the same schedule. Each rank contributes its bucket and token count to one
small all-reduce (``agree``: elementwise max of five integers, the caller's collective); the
agreed bucket is the largest any rank has, prefill if any rank prefills, and the smallest token
count of any rank. The decision for a bucket is searched on a *canonical* batch built from the
bucket alone (:func:`canonical`), and the search is deterministic, so every rank that agrees on
the bucket gets the same choice without sending it. If some rank has too few tokens to cut into
the chosen microbatch count, every rank sees that in the agreed minimum and all run ``off``.

Cold buckets. A full search of a 61-layer model takes a few hundred milliseconds, too long for
a step that meets a new bucket, so a cold decision scores a short list of candidates
(:data:`QUICK_NAMED` and one more chunked form) on the evaluator's two- and one-layer
proxies, about twenty small simulations. ``Planner.warm`` runs the full search for a bucket
and its result replaces the quick one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import attrs

from overlap.cost.hardware import Hardware
from overlap.errors import ConfigError
from overlap.ops_graph.graph import ModelGraph
from overlap.plan.batch import Batch
from overlap.plan.plan import Plan
from overlap.plan.strategies import STRATEGIES
from overlap.search.choice import SearchResult
from overlap.search.evaluator import Evaluator, Progress, simulated
from overlap.search.space import Choice, chunked_choice, realise

QUICK_NAMED = ("off", "single_batch", "chunked_experts", "deepseek_prefill")
QUICK_CHUNKS = ((2, True),)  # (chunks, dispatch cut too)
PHASE_CODE = {"decode": 0, "prefill": 1}  # max: prefill when any rank prefills
Agree = Callable[[Sequence[int]], Sequence[int]]


@attrs.frozen
class Decision:
    """What a step runs: the bucket's choice and its plan (built for the bucket's canonical
    batch: the schedule; :meth:`Planner.plan_for` builds it for an exact batch).

    key:    the agreed bucket.
    choice: the point of the search space; ``choice.named == "off"`` when overlap is off.
    plan:   the validated plan of ``choice`` on the canonical batch.
    step_s: its simulated (quick: estimated) step time.
    quick:  whether it came from the cold-path quick search rather than the full one.
    reason: why it is ``off`` although the bucket's choice was not ("" otherwise).
    """

    key: object
    choice: Choice
    plan: Plan = attrs.field(repr=False)
    step_s: float
    quick: bool
    reason: str = ""

    @property
    def off(self) -> bool:
        """Whether the step should run the model's own forward, without the executor."""
        return bool(self.plan.options.get("off"))

    @property
    def n_micro(self) -> int:
        return self.plan.n_micro


def canonical(phase: str, tokens: int, requests: int, context: int) -> Batch:
    """The batch a bucket is searched on: ``requests`` requests sharing ``tokens`` tokens (decode:
    one each), each after ``context`` cached tokens — a function of the bucket alone."""
    tokens, requests = max(tokens, 1), max(requests, 1)
    if phase == "decode":
        return Batch.decode(requests, max(context, 1))
    requests = min(requests, tokens)
    base, extra = divmod(tokens, requests)
    return Batch.of((base + (i < extra), context) for i in range(requests))


def agreed(phase: str, tokens_b: int, requests_b: int, context_b: int, tokens: int,
           agree: Agree | None) -> tuple[str, int, int, int, int]:
    """(phase, token, request and context buckets, smallest token count) over all ranks."""
    if agree is None:
        return phase, tokens_b, requests_b, context_b, tokens
    out = list(agree([PHASE_CODE[phase], tokens_b, requests_b, context_b, -tokens]))
    if len(out) != 5:
        raise ConfigError(f"'agree' must return the 5 elementwise maxima (got {out!r})")
    code, tb, rb, cb, neg = (int(v) for v in out)
    if code not in (0, 1) or tb < tokens_b or rb < requests_b or cb < context_b or -neg > tokens:
        mine = [PHASE_CODE[phase], tokens_b, requests_b, context_b, -tokens]
        raise ConfigError(f"'agree' returned {out!r}, which is not an elementwise maximum that "
                          f"includes this rank's {mine}")
    return ("prefill" if code else "decode"), tb, rb, cb, -neg


def quick_choices(present: Sequence[str]) -> list[Choice]:
    """The cold path's short list: a few named strategies and chunked one-microbatch forms."""
    out = [Choice(STRATEGIES[n].microbatches, n, named=n) for n in QUICK_NAMED]
    if {"dispatch", "experts", "combine"} <= set(present):
        out += [chunked_choice(r, d) for r, d in QUICK_CHUNKS]
    return out


def quick_search(model: ModelGraph, batch: Batch, hw: Hardware, comm_mode: str,
                 present: Sequence[str]) -> SearchResult:
    """The fastest of :func:`quick_choices` by the evaluator's estimate, built and validated."""
    start = time.perf_counter()
    ev = Evaluator(lambda grain: model, batch, hw, simulated(comm_mode), Progress(False))
    scores = {c: ev(c) for c in quick_choices(present)}
    best = min(scores, key=scores.get)
    named = min((c for c in scores if c.named), key=scores.get)
    plan = realise(best, model, batch, part=ev.split(best))
    return SearchResult(plan, scores[best], best, named.named, scores[named], ev.count,
                        time.perf_counter() - start)
