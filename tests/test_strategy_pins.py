"""Each named strategy's plan, printed, is pinned: refactors of the strategy layer change nothing.

The expected files in ``tests/data/plans`` were generated from the code *before* the strategies
moved into records and ``auto`` into ``overlap.search`` (main at 9fe5bb0), by the same rendering
as :func:`_render` below; a difference here is a change in what a named strategy builds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from overlap.errors import OverlapError
from overlap.ops_graph.templates import ParallelConfig, build_model
from overlap.plan import Batch, Plan, build_plan, split

DATA = Path(__file__).resolve().parent / "data" / "plans"
CASES = {
    "ep16-prefill": (ParallelConfig(ep=16), "prefill", "one", Batch.prefill(4096, 3), 2),
    "ep16-decode-two_stage": (ParallelConfig(ep=16), "decode", "two_stage", Batch.decode(32, 2048), 2),
    "tp4-prefill": (ParallelConfig(tp=4), "prefill", "one", Batch.prefill(1000, 2), 2),
    "tp2ep8-decode-fine": (ParallelConfig(tp=2, ep=8), "decode", "fine", Batch.decode(16, 512), 2),
    "ep16-prefill-n3": (ParallelConfig(ep=16), "prefill", "one", Batch.prefill(3000, 4), 3),
    "ep16-prefill-refused": (ParallelConfig(ep=16), "prefill", "one", Batch.prefill(1), 2),
}
PINNED = ["sequential", "ascend_dbo", "sglang_tbo", "vllm_dbo", "deepseek_prefill",
          "deepseek_decode", "ascend_multistream_mla"]


def _render(plan: Plan) -> str:
    steps = "\n".join(" ".join(f"{s.op}({s.micro})@{s.layer}/{s.stream}" for s in plan.slot_steps(i))
                      for i in range(len(plan.slots)))
    return (f"{plan}\n-- options: {dict(plan.options)!r}\n-- streams: {plan.streams!r}\n"
            f"-- steps per slot (op(micro)@layer/stream):\n{steps}\n"
            f"-- waits: {[tuple(w) for w in plan.waits()]}\n")


def _cases():
    for case in CASES:
        for name in PINNED:
            yield case, name, False
        if case == "tp2ep8-decode-fine":
            yield from ((case, name, True) for name in PINNED)


@pytest.mark.parametrize(("case", "name", "vector"), list(_cases()))
def test_named_strategy_plan_is_unchanged(case, name, vector):
    """The plan (print, options, streams, every step and wait) equals the pinned text."""
    parallel, phase, attention, batch, n = CASES[case]
    model = build_model("deepseek-v3", parallel, phase=phase, attention=attention, num_layers=5)
    try:
        text = _render(build_plan(name, model, split(batch, n, split_requests=True),
                                  multistream_mla=vector))
    except OverlapError as exc:
        text = f"error: {type(exc).__name__}: {exc}\n"
    path = DATA / f"{case}.{name}{'+multistream_mla' if vector else ''}.txt"
    assert text == path.read_text(), f"{name} on {case} no longer builds the pinned plan ({path})"
