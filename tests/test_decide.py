"""``Planner.decide``: one plan per step, cached per bucket, ``off`` when overlap loses, and the
same decision on every data-parallel rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings

from overlap.backends.simulated import simulate
from overlap.errors import ConfigError
from overlap.ops_graph.templates import ParallelConfig
from overlap.plan import Batch, build_plan, split, validate
from overlap.search import Planner
from overlap.search.decision import canonical
from tests.ranks import free_port, run_ranks
from tests.strategies import batches
from tests.timeouts import deadline


@pytest.fixture(autouse=True)
def _timeout():
    """Fail a test that runs past 120 s instead of hanging the suite."""
    with deadline(120):
        yield


@pytest.fixture(scope="module")
def planner() -> Planner:
    return Planner("deepseek-v3", ParallelConfig(ep=32), "h800", num_layers=8)


def _ranks(planner: Planner, batches: list[Batch | None]):
    """Each rank's decision, agreed by an in-process elementwise max over all ranks' figures."""
    vectors = []
    for b in batches:  # what each rank contributes: the same figures decide() computes
        if b is None:
            vectors.append([0, 0, 0, 0, 0])
            continue
        phase = "decode" if all(r.is_decode for r in b.requests) else "prefill"
        from overlap.search import bucket

        ctx = sum(r.context_len for r in b.requests) // len(b.requests)
        vectors.append([int(phase == "prefill"), bucket(b.tokens), bucket(len(b.requests)),
                        bucket(ctx), -b.tokens])

    def agree(mine):
        assert list(mine) in vectors  # each rank sends what it should
        return [max(v[i] for v in vectors) for i in range(5)]

    return [planner.decide(b, agree=agree) for b in batches]


def test_a_bucket_is_decided_once(planner):
    """Two batches of one bucket get the very same decision object."""
    first = planner.decide(Batch.decode(30, 4000))
    assert planner.decide(Batch.decode(32, 4096)) is first
    assert first.key == ("decode", 32, 32, 4096)


def test_small_decode_turns_two_microbatch_overlap_off(planner):
    """At 32 tokens per device (h800, EP32) every two-microbatch plan loses to sequential; the
    decision is a one-microbatch plan at least as fast as sequential and faster than them."""
    decision = planner.decide(Batch.decode(32, 4096))
    assert decision.n_micro == 1
    batch = canonical(*decision.key)
    model = planner.model_graph("decode")
    two = split(batch, 2, split_requests=True)

    def step(plan):
        return simulate(plan, "h800", comm_mode="low_latency").makespan

    seq = step(build_plan("sequential", model, two))
    ours = step(decision.plan)
    assert ours <= seq
    for name in ("ascend_dbo", "sglang_tbo", "vllm_dbo", "deepseek_prefill"):
        assert ours < step(build_plan(name, model, two)), name


def test_large_prefill_keeps_two_microbatches(planner):
    """Where two microbatches hide the all-to-all (16k-token prefill), the decision uses them."""
    decision = planner.decide(Batch.prefill(16384, 4))
    assert decision.n_micro >= 2 and not decision.off


def test_ranks_with_different_batches_agree(planner):
    """Ranks in different buckets (one idle) all get the choice of the largest bucket."""
    batches = [Batch.prefill(16384, 4), Batch.prefill(3000, 1), Batch.prefill(9000, 3)]
    decisions = _ranks(planner, batches)
    assert len({d.choice for d in decisions}) == 1
    assert len({d.n_micro for d in decisions}) == 1
    assert decisions[0].key == ("prefill", 16384, 4, 0)


def test_a_rank_too_small_to_split_turns_every_rank_off(planner):
    """If any rank cannot cut its batch into the agreed count, all ranks run ``off``."""
    decisions = _ranks(planner, [Batch.prefill(16384, 4), None])
    assert all(d.off for d in decisions)
    assert decisions[0].reason == "a rank has 0 token(s), fewer than 2 microbatches"
    assert decisions[0].choice == decisions[1].choice


def test_off_decision_is_the_plain_forward(planner):
    """An ``off`` decision's plan issues exactly what sequential does, on one stream."""
    (decision, _) = _ranks(planner, [Batch.prefill(16384, 4), None])
    plan = decision.plan
    seq = build_plan("sequential", plan.model, split(plan.split.batch, 1))
    assert plan.steps == seq.steps and len(plan.streams) == 1


def test_plan_for_builds_the_decision_for_the_exact_batch(planner):
    """``plan_for`` realises the bucket's choice on the step's own batch, validated."""
    batch = Batch.prefill(12000, 3)
    decision = planner.decide(batch)
    plan = planner.plan_for(decision, batch)
    assert plan.split.batch == batch and plan.n_micro == decision.n_micro
    assert validate(plan) is plan


def test_warm_replaces_the_quick_decision_with_the_full_search():
    """A cold decision is quick; warming the bucket runs the full search, never slower."""
    planner = Planner("deepseek-v3", ParallelConfig(ep=32), "h800", num_layers=8)
    batch = Batch.decode(128, 4096)
    quick = planner.decide(batch)
    assert quick.quick
    planner.warm([batch])
    full = planner.decide(batch)
    assert not full.quick and full.step_s <= quick.step_s * 1.001


def test_agree_that_is_not_a_maximum_is_refused(planner):
    """An ``agree`` returning less than this rank's own figures is a broken collective."""
    with pytest.raises(ConfigError, match=r"^'agree' returned \[0, 1, 1, 1, -1\], which is not "
                                          r"an elementwise maximum that includes this rank's "):
        planner.decide(Batch.prefill(64), agree=lambda mine: [0, 1, 1, 1, -1])


def test_unknown_phase_is_refused(planner):
    """The phase is prefill or decode."""
    with pytest.raises(ConfigError, match=r"^'phase' must be one of prefill, decode \(got 'x'\)"):
        planner.decide_shape("x", 8, 8, 0)


def _run_ranks(tmp_path, batches: list) -> list[dict]:
    """Run one decide_worker per batch (a real gloo group) and load what each rank decided."""
    pytest.importorskip("torch")
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    port, outs = free_port(), [tmp_path / f"rank{r}.json" for r in range(len(batches))]
    worker = Path(__file__).with_name("decide_worker.py")
    logs = run_ranks([[worker, r, len(batches), port, outs[r], json.dumps({"batches": batches})]
                      for r in range(len(batches))], 100)
    for r, out in enumerate(outs):
        assert out.exists(), f"rank {r} wrote no result:\n{logs[r]}"
    return [json.loads(o.read_text()) for o in outs]


def test_real_ranks_agree_on_one_decision_and_collective_order(tmp_path):
    """Three gloo ranks with different prefill batches decide alike and issue the same
    collectives in the same order."""
    batches = [[[4096, 0]] * 4, [[3000, 0]], [[2048, 0], [1000, 0], [500, 0]]]
    ranks = _run_ranks(tmp_path, batches)
    assert len({r["choice"] for r in ranks}) == 1 and len({r["n"] for r in ranks}) == 1
    assert ranks[0]["key"] == ["prefill", 16384, 4, 0] and not ranks[0]["off"]
    orders = [r["order"] for r in ranks]  # per group: (layer, microbatch, op) in issue order
    assert orders[0]["ep"] and orders[1] == orders[0] and orders[2] == orders[0]


def test_real_idle_rank_turns_every_rank_off(tmp_path):
    """A rank with nothing to run takes part in the agreement, and every rank runs off."""
    ranks = _run_ranks(tmp_path, [[[4096, 0]] * 4, None])
    assert all(r["off"] for r in ranks)
    assert ranks[0]["reason"] == "a rank has 0 token(s), fewer than 2 microbatches"


@settings(max_examples=60, deadline=None)
@given(batch=batches(max_requests=40))
def test_decide_reads_the_batch_figures_exactly(planner, batch):
    """decide(batch) is decide_shape on the batch's phase, tokens, requests and mean context,
    computed here request by request (decide reads them from the Batch's cached sums)."""
    reqs = batch.requests
    phase = "decode" if all(r.is_decode for r in reqs) else "prefill"
    figures = (phase, sum(r.query_len for r in reqs), len(reqs),
               sum(r.context_len for r in reqs) // len(reqs))
    seen = []
    planner.decide(batch, agree=lambda mine: seen.append(list(mine)) or mine)
    planner.decide_shape(*figures, agree=lambda mine: seen.append(list(mine)) or mine)
    assert seen[0] == seen[1], f"{batch}: decide sent {seen[0]}, the figures give {seen[1]}"
