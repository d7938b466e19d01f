"""Expert parallelism over two real processes (gloo on localhost): dispatch and combine are
``all_to_all_single`` calls, and each rank's output equals the single-process forward's.

Each test starts two ranks of ``tests/dist_worker.py`` as subprocesses with a hard timeout; a
hang kills both and fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from overlap.plan import Batch  # noqa: E402
from overlap.reference import TINY, ReferenceModel  # noqa: E402
from tests import ranks  # noqa: E402
from tests.ranks import free_port  # noqa: E402

WORKER = Path(__file__).with_name("dist_worker.py")
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def run_ranks(tmp_path: Path, spec: dict, world: int = 2) -> list[dict]:
    """Run ``world`` ranks to completion (or kill them all at the timeout) and load their results."""
    port, outs = free_port(), [tmp_path / f"rank{r}.pt" for r in range(world)]
    logs = ranks.run_ranks([[WORKER, r, world, port, outs[r], json.dumps(spec)]
                            for r in range(world)], TIMEOUT_S)
    for r, out in enumerate(outs):
        assert out.exists(), f"rank {r} wrote no result:\n{logs[r]}"
    return [torch.load(o) for o in outs]


def single_process(batches: list[list[tuple[int, int]]]) -> dict:
    """The whole of every rank's batch through one process holding every expert."""
    batch = Batch.of([r for b in batches for r in b])
    model = ReferenceModel(TINY, num_layers=3)
    contexts = {i: r.context_len for i, r in enumerate(batch.requests) if r.context_len}
    inputs = model.inputs(batch.tokens)
    step = model.step(batch, model.cache(contexts))
    return model.plain_forward(inputs["hidden"], inputs["residual"], step)


def assert_ranks_match(results: list[dict], batches: list, ref: dict) -> None:
    start = 0
    for rank, (res, b) in enumerate(zip(results, batches)):
        assert "error" not in res, f"rank {rank}: {res.get('error')}"
        end = start + sum(q for q, _ in b)
        for name in ("hidden_out", "residual_out"):
            assert torch.equal(res[name], ref[name][start:end]), f"rank {rank}: {name} differs"
        start = end


# Ranks with different token counts (6 and 8) and a mix of prefill, decode and chunked prefill.
UNEVEN = [[(5, 0), (1, 4)], [(3, 0), (1, 2), (4, 3)]]


def test_expert_parallel_ranks_reproduce_the_single_process_forward(tmp_path):
    """Two EP ranks with uneven token counts each get the single-process output for their tokens."""
    results = run_ranks(tmp_path, {"batches": UNEVEN, "n": 2, "strategy": "deepseek_prefill",
                                   "agree": True})
    assert [r["n"] for r in results] == [2, 2]
    assert_ranks_match(results, UNEVEN, single_process(UNEVEN))


def test_ranks_agree_on_the_microbatch_count_with_a_min_all_reduce(tmp_path):
    """A rank that cannot split makes every rank run one microbatch, and results still match."""
    batches = [[(6, 0)], [(2, 0), (3, 1), (1, 2)]]  # rank 0: one request, not cut -> 1 microbatch
    results = run_ranks(tmp_path, {"batches": batches, "n": 2, "strategy": "ascend_dbo",
                                   "agree": True})
    assert [r["n"] for r in results] == [1, 1]
    assert_ranks_match(results, batches, single_process(batches))


def test_mismatched_plans_are_rejected_before_any_collective_runs(tmp_path):
    """Without agreement the ranks' plans issue different collectives; validation refuses them
    on every rank instead of hanging."""
    batches = [[(6, 0)], [(2, 0), (3, 1), (1, 2)]]
    results = run_ranks(tmp_path, {"batches": batches, "n": 2, "strategy": "ascend_dbo",
                                   "agree": False})
    expected = ("PlanError: rank 0 uses 1 microbatches but rank 1 uses 2: agree the count "
                "across ranks first (plan.split.agree)")
    assert [r.get("error") for r in results] == [expected, expected]


def test_a_cut_request_under_expert_parallelism_reproduces_the_single_process_forward(tmp_path):
    """Cutting requests across microbatches on both ranks still matches the single process."""
    batches = [[(7, 0)], [(2, 3), (5, 0)]]
    results = run_ranks(tmp_path, {"batches": batches, "n": 2, "strategy": "vllm_dbo",
                                   "agree": True, "split_requests": True})
    assert [r["n"] for r in results] == [2, 2]
    assert_ranks_match(results, batches, single_process(batches))
