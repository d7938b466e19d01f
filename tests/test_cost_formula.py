"""Shapes and cost formulas: the figures templates attach to ops."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlap.ops_graph import Formula, OpCost, Shape
from tests.strategies import costs, formulas


def test_shape_of_requests_counts_causal_pairs():
    """A prefill of 3 tokens after 2 cached ones sees 2*3 + (1+2+3) query-key pairs."""
    s = Shape.of_requests([(3, 2), (1, 10)])
    assert (s.tokens, s.requests, s.context, s.pairs) == (4, 2, 16, 12 + 11)


def test_shape_rejects_empty_requests():
    """A request must compute at least one token."""
    with pytest.raises(ValueError, match="query_len >= 1 and context_len >= 0 .got query_len=0"):
        Shape.of_requests([(0, 5)])
    with pytest.raises(ValueError, match="'tokens' must be >= 0 .got -1."):
        Shape(tokens=-1)


def test_prefill_and_decode_helpers():
    """Even prefill split and uniform decode shapes."""
    assert Shape.prefill(10, 3) == Shape.of_requests([(4, 0), (3, 0), (3, 0)])
    assert Shape.decode(4, 100) == Shape(tokens=4, requests=4, context=404, pairs=404)


def test_formula_evaluates_every_term():
    """Each coefficient multiplies its feature; the saturating term approaches its total."""
    f = Formula(const=1, per_token=2, per_request=3, per_context=4, per_pair=5, saturating=100, hit=0.5)
    s = Shape(tokens=2, requests=1, context=3, pairs=4)
    assert f(s) == 1 + 4 + 3 + 12 + 20 + 100 * (1 - 0.25)


def test_formula_rejects_bad_hit_and_unknown_terms():
    """Probabilities stay in [0, 1]; JSON with an unknown term lists the valid ones."""
    with pytest.raises(ValueError, match=r"'hit' must be in \[0, 1\] \(got 2\)"):
        Formula(hit=2)
    with pytest.raises(ValueError, match=r"unknown formula term\(s\) \['per_cow'\]; valid: const"):
        Formula.from_dict({"per_cow": 1})


@given(formulas, formulas, st.integers(0, 10_000), st.integers(0, 10_000))
def test_formula_addition_is_pointwise(a, b, tokens, context):
    """(a + b)(shape) == a(shape) + b(shape) when their hit rates agree."""
    b = Formula(**{**b.to_dict(), "hit": a.hit}) if a.saturating and b.saturating else b
    shape = Shape(tokens=tokens, context=context)
    assert (a + b)(shape) == pytest.approx(a(shape) + b(shape), rel=1e-9)


@given(costs)
def test_op_cost_dict_round_trip(cost):
    """OpCost survives its dict form."""
    assert OpCost.from_dict(cost.to_dict()) == cost


def test_op_cost_rejects_unknown_dtype():
    """Only bf16, int8 and fp8 matrix work is priced."""
    with pytest.raises(ValueError, match="'dtype' must be one of bf16, int8, fp8 .got 'fp4'."):
        OpCost(dtype="fp4")
