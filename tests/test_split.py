"""Splitting a batch into microbatches: coverage, order, positions, thresholds, rank agreement."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlap.errors import ConfigError
from overlap.ops_graph import Shape
from overlap.ops_graph.templates import ParallelConfig, build_model
from overlap.plan import Batch, agree, graph_cost, split, split_agreed
from tests.strategies import batches

MODEL = build_model("deepseek-v3", ParallelConfig(ep=16), phase="decode", num_layers=4)


def _tokens(s):
    """Every (request, position) a split covers, in microbatch order."""
    return [(p.request, p.start + k) for m in s.micro for p in m.pieces for k in range(p.length)]


@settings(max_examples=150, deadline=None)
@given(batches(), st.integers(1, 4), st.booleans(), st.sampled_from(["tokens", "cost"]))
def test_split_covers_every_token_once_in_order(batch, n, cut, balance):
    """Every token of the batch is in exactly one microbatch, in the batch's order."""
    s = split(batch, n, split_requests=cut, balance=balance, cost=graph_cost(MODEL))
    expected = [(i, k) for i, r in enumerate(batch.requests) for k in range(r.query_len)]
    assert _tokens(s) == expected
    assert [m.token_start for m in s.micro] == [0, *[m.token_end for m in s.micro[:-1]]]
    assert s.micro[-1].token_end == batch.tokens


@settings(max_examples=100, deadline=None)
@given(batches(), st.integers(2, 4))
def test_split_without_cutting_keeps_requests_whole(batch, n):
    """Without split_requests every microbatch holds whole requests."""
    s = split(batch, n)
    for m in s.micro:
        for p in m.pieces:
            assert (p.start, p.length) == (0, batch.requests[p.request].query_len)


@settings(max_examples=100, deadline=None)
@given(batches(), st.integers(2, 4))
def test_pieces_keep_true_positions(batch, n):
    """A piece's context is its request's context plus the tokens before it, and shapes agree."""
    s = split(batch, n, split_requests=True)
    for m in s.micro:
        for p in m.pieces:
            assert p.context_len == batch.requests[p.request].context_len + p.start
        assert m.shape == Shape.of_requests((p.length, p.context_len) for p in m.pieces)


def test_split_of_one_long_prefill_halves_it():
    """One 1000-token prompt cut in two: 500 + 500, the second half after 500 cached tokens."""
    s = split(Batch.prefill(1000), 2, split_requests=True)
    assert s.token_counts == (500, 500)
    assert s.micro[1].pieces[0].context_len == 500
    assert s.micro[1].continues_request


def test_cost_balance_moves_the_cut_past_cheap_requests():
    """Three short-context requests balance one long-context request of equal length."""
    batch = Batch.of([(100, 0), (100, 0), (100, 0), (100, 60000)])
    assert split(batch, 2).token_counts == (200, 200)
    assert split(batch, 2, balance="cost", cost=graph_cost(MODEL)).token_counts == (300, 100)


def test_graph_cost_grows_with_context():
    """Attention reads more context, so the same tokens cost more later in a sequence."""
    cost = graph_cost(MODEL)
    assert cost(Shape.decode(8, 8000)) > cost(Shape.decode(8, 100)) > 0


def test_split_refused_when_too_few_requests():
    """A batch of one request is not split unless requests may be cut."""
    s = split(Batch.prefill(100), 2)
    assert s.n == 1
    assert s.reason == ("not split: 1 request(s) cannot fill 2 microbatches without splitting a "
                        "request")


def test_split_refused_below_min_tokens():
    """Too few tokens for the minimum per microbatch gives one microbatch and says why."""
    s = split(Batch.prefill(10, 5), 2, min_tokens=8)
    assert (s.n, s.reason) == (1, "not split: 10 tokens < 2 x min_tokens 8")


def test_split_refused_when_a_microbatch_would_be_too_small():
    """A cut that leaves a microbatch under min_tokens is refused."""
    s = split(Batch.of([(1, 0), (20, 0)]), 2, min_tokens=5)
    assert (s.n, s.reason) == (1, "not split: a microbatch would have 1 tokens (min_tokens 5)")


def test_split_refused_above_max_imbalance():
    """Whole requests of 10 and 30 tokens are 0.67 apart, above a 0.5 limit."""
    s = split(Batch.of([(10, 0), (30, 0)]), 2, max_imbalance=0.5)
    assert (s.n, s.reason) == (1, "not split: imbalance 0.67 > max_imbalance 0.5")


def test_split_accepted_within_max_imbalance():
    """The same batch splits when the limit allows it."""
    assert split(Batch.of([(10, 0), (30, 0)]), 2, max_imbalance=0.7).token_counts == (10, 30)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n": 0}, "'n' must be in 1..8 (got 0)"),
    ({"n": 2, "balance": "flops"}, "'balance' must be one of tokens, cost (got 'flops')"),
    ({"n": 2, "min_tokens": 0}, "'min_tokens' must be >= 1 (got 0)"),
    ({"n": 2, "max_imbalance": 1.5}, "'max_imbalance' must be in [0, 1] (got 1.5)"),
])
def test_split_rejects_bad_options(kwargs, message):
    """Invalid options raise ConfigError naming the option and the valid range."""
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        split(Batch.prefill(100, 4), **kwargs)


class FakeGroup:
    """A data-parallel group simulated in one process: each rank's wish is known up front."""

    def __init__(self, wishes):
        self.wishes = list(wishes)

    def all_reduce_min(self, value: int) -> int:
        assert value in self.wishes
        return min(self.wishes)


@settings(max_examples=60, deadline=None)
@given(st.lists(batches(), min_size=2, max_size=5), st.integers(1, 4))
def test_split_agreed_gives_every_rank_the_same_count(rank_batches, n):
    """Ranks with different batches agree on one microbatch count through the all-reduce."""
    options = {"min_tokens": 4}
    group = FakeGroup(split(b, n, **options).n for b in rank_batches)
    splits = [split_agreed(b, n, group.all_reduce_min, **options) for b in rank_batches]
    assert {s.n for s in splits} == {min(group.wishes)}


def test_a_refusing_rank_makes_every_rank_run_whole():
    """One rank too small to split forces one microbatch on all, with a reason."""
    big, small = Batch.prefill(4096, 8), Batch.prefill(3)
    group = FakeGroup([split(big, 2, min_tokens=4).n, split(small, 2, min_tokens=4).n])
    s = split_agreed(big, 2, group.all_reduce_min, min_tokens=4)
    assert (s.n, s.reason) == (1, "not split: another data-parallel rank refused")


def test_split_agreed_resplits_to_a_smaller_agreed_count():
    """A rank that wished for 4 microbatches re-splits to the agreed 3."""
    s = split_agreed(Batch.prefill(4000, 8), 4, lambda n: 3)
    assert s.n == 3


def test_agree_rejects_a_result_that_is_not_a_minimum():
    """An all-reduce returning more than this rank's wish is a caller bug."""
    with pytest.raises(ConfigError, match=r"^all_reduce_min returned 3, outside 1\.\.2: not a minimum$"):
        agree(2, lambda n: 3)
