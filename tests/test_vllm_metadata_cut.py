"""Cutting a request in the vLLM adapter, without an engine: when the split decision cuts a
request (``decide_split``), that cut splits get their own shape buckets, and that a builder
whose metadata would not read the continued request's context is refused (``CutError``).

``slice_common`` is checked against vLLM's own ``split_attn_metadata`` for cuts in
tests/test_vllm_plugin.py (it needs vLLM); the engine runs are there too.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlap.integrations.vllm.adapter import cut_flags, decide_split, shape_bucket
from overlap.integrations.vllm.config import OverlapConfig
from overlap.plan import Batch, build_plan, split
from tests.strategies import batches
from tests.test_kv_order import LONG, MODEL, _own_streams

SMALL = OverlapConfig(min_tokens=1)


class Cuts:
    """A ``cut`` callback: records the splits it was asked about, answers ``why``."""

    def __init__(self, why: str = "") -> None:
        self.why, self.asked = why, []

    def __call__(self, planned) -> str:
        self.asked.append(planned.token_counts)
        return self.why


def test_a_single_long_prompt_is_cut_in_two() -> None:
    """One request cannot fill two microbatches at a boundary: it is cut in the middle, the
    second microbatch continuing it."""
    cut = Cuts()
    planned, reason = decide_split(Batch.of([(600, 0)]), SMALL, 1, None, cut=cut)
    assert (planned.token_counts, reason, cut.asked) == ((300, 300), "", [(300, 300)])
    assert cut_flags(planned) == (False, True)
    assert [(p.request, p.start, p.length, p.context_len) for p in planned.micro[1].pieces] == [
        (0, 300, 300, 300)]


def test_a_boundary_split_within_max_imbalance_is_kept() -> None:
    """600 | 64 at the boundary is within max_imbalance 1.0: no request is cut, and the cut
    is not even considered."""
    cut = Cuts()
    planned, _ = decide_split(Batch.of([(600, 0), (40, 0), (24, 0)]), SMALL, 1, None, cut=cut)
    assert (planned.token_counts, cut_flags(planned), cut.asked) == ((600, 64), (False, False), [])


def test_a_too_uneven_boundary_split_cuts_the_long_prompt_instead() -> None:
    """Under max_imbalance 0.25 the boundary split is refused; the cut split is even."""
    config = OverlapConfig(min_tokens=1, max_imbalance=0.25)
    planned, _ = decide_split(Batch.of([(600, 0), (40, 0), (24, 0)]), config, 1, None, cut=Cuts())
    assert planned.token_counts == (332, 332) and cut_flags(planned) == (False, True)


def test_a_refused_cut_leaves_the_boundary_refusal() -> None:
    """When ``cut`` says the cut cannot run, the step is not split, for the boundary reason."""
    planned, reason = decide_split(Batch.of([(600, 0)]), SMALL, 1, None, cut=Cuts("no"))
    assert planned is None
    assert reason == "not split: 1 request(s) cannot fill 2 microbatches without splitting a request"


def test_without_a_cut_callback_requests_are_never_cut() -> None:
    """``auto`` and callers that pass no ``cut`` split at request boundaries only."""
    planned, _ = decide_split(Batch.of([(600, 0)]), SMALL, 1, None)
    assert planned is None


@settings(max_examples=60, deadline=None)
@given(batches(), st.integers(2, 4))
def test_decode_steps_are_never_cut(batch: Batch, n: int) -> None:
    """A step of one-token queries has nothing to cut: its split, if any, is at boundaries."""
    decode = Batch.of([(1, r.context_len) for r in batch.requests])
    cut = Cuts()
    planned, _ = decide_split(decode, OverlapConfig(min_tokens=1, microbatches=n), 1, None,
                              cut=cut)
    assert cut.asked == [] or planned is None
    assert planned is None or not any(cut_flags(planned))


def test_data_parallel_ranks_vote_once_on_the_cut_split() -> None:
    """With DP the vote is on the count this rank reached (cutting): one all-reduce."""
    votes: list[int] = []

    def all_reduce_min(n: int) -> int:
        votes.append(n)
        return n

    planned, _ = decide_split(Batch.of([(600, 0)]), SMALL, 2, all_reduce_min, cut=Cuts())
    assert (planned.token_counts, votes) == ((300, 300), [2])
    votes.clear()
    planned, reason = decide_split(Batch.of([(600, 0)]), SMALL, 2, lambda n: 1, cut=Cuts())
    assert (planned, reason) == (None, "not split: another data-parallel rank refused")


def test_a_cut_split_has_its_own_shape_bucket() -> None:
    """The bucket of a split that cuts a request names which microbatches continue one, so
    its executor's plan is built for (and orders) that cut."""
    whole = split(Batch.of([(32, 0), (32, 0)]), 2, min_tokens=1)
    cut = split(Batch.of([(64, 0)]), 2, min_tokens=1, split_requests=True)
    assert shape_bucket(whole) == (2, 32, 32)
    assert shape_bucket(cut) == (2, 32, 32, (False, True))


# -- check_continuation ------------------------------------------------------------------------

def _metadata(num_decodes: int, prefill) -> SimpleNamespace:
    return SimpleNamespace(num_decodes=num_decodes, prefill=prefill)


def test_a_continued_prefill_row_with_its_context_passes() -> None:
    from overlap.integrations.vllm.metadata import check_continuation

    check_continuation(_metadata(0, SimpleNamespace(chunked_context=object())), "B")
    check_continuation(_metadata(1, None), "B")  # row 0 is a decode: it reads the cache


@pytest.mark.parametrize("prefill", [None, SimpleNamespace(chunked_context=None),
                                     SimpleNamespace()], ids=["no-prefill", "no-context", "other"])
def test_a_continued_prefill_row_without_context_is_refused(prefill) -> None:
    """Metadata that would let the second piece attend only to itself: one CutError."""
    from overlap.integrations.vllm.metadata import CutError, SplitError, check_continuation

    with pytest.raises(CutError, match=r"^AscendBuilder built no cached context for a request "
                                       r"cut by the previous microbatch") as info:
        check_continuation(_metadata(0, prefill), "AscendBuilder")
    assert isinstance(info.value, SplitError)  # the adapter runs the step stock


# -- the adapter's check of the plan, once per bucket -------------------------------------------

def _adapter(monkeypatch: pytest.MonkeyPatch, plan_for):
    """A DeepseekOverlap with just what ``_cut_check`` reads (its real __init__ needs vLLM);
    ``plan_for(split)`` stands in for the strategy's plan."""
    from collections import Counter

    from overlap.integrations.vllm import adapter as mod

    built: list = []

    def build_plan(name, model, planned):
        built.append(planned.token_counts)
        return plan_for(planned)

    monkeypatch.setattr(mod, "build_plan", build_plan)
    a = mod.DeepseekOverlap.__new__(mod.DeepseekOverlap)
    a.config, a.cut_off, a._kv_checked, a._templates = SMALL, "", {}, {}
    a._layers, a._model_graph, a.stats, a._splits = (), MODEL, Counter(), {"cached": 1}
    return a, built


def test_a_plan_that_orders_the_cut_is_checked_once_per_bucket(monkeypatch) -> None:
    a, built = _adapter(monkeypatch, lambda s: build_plan("deepseek_prefill", MODEL, s))
    cut = split(Batch.of([(600, 0)]), 2, min_tokens=1, split_requests=True)
    assert a._cut_check(cut) == a._cut_check(cut) == ""
    assert built == [(300, 300)] and a.cut_off == "" and a._splits == {"cached": 1}


def test_a_plan_that_does_not_order_the_cut_stops_cutting_with_one_log(monkeypatch, caplog
                                                                       ) -> None:
    """The check fails: this split is refused, cutting stops for every later step (cached
    splits dropped), and the reason is logged once."""
    boundary = build_plan("deepseek_prefill", MODEL, split(LONG, 2, min_tokens=1))
    a, _ = _adapter(monkeypatch, lambda s: _own_streams(boundary, 1))
    cut = split(Batch.of([(600, 0)]), 2, min_tokens=1, split_requests=True)
    with caplog.at_level("INFO", logger="vllm.overlap"):
        why = a._cut_check(cut)
        assert a._cut_check(cut) == why and a.cut_off == why
        other = split(Batch.of([(900, 0)]), 2, min_tokens=1, split_requests=True)
        assert a._cut_check(other) == why  # another bucket: not planned, refused
    assert why.startswith("the deepseek_prefill plan does not order a cut request's KV cache: "
                          "attn (layer 0, microbatch 1, stream compute_mb1) may run before")
    assert a._splits == {} and a.stats["cut_stopped"] == 1
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [f"overlap: requests are no longer cut, steps split at request boundaries "
                      f"only ({why})"]
    planned, reason = decide_split(Batch.of([(600, 0)]), SMALL, 1, None, cut=a._cut_check)
    assert planned is None and reason.startswith("not split: 1 request(s)")
