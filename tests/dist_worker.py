"""One rank of the expert-parallel tests (run as a script by tests/test_distributed.py).

Usage: ``python dist_worker.py RANK WORLD PORT OUT SPEC`` where SPEC is JSON:
``{"batches": [[[q, ctx], ...] per rank], "n": 2, "strategy": "...", "agree": true,
"backend": "threads"}``. The rank joins a gloo group on localhost, agrees the microbatch count
with a real MIN all-reduce (unless ``agree`` is false), checks rank symmetry of the plans with
an all-gather, runs its plan with dispatch/combine as real all-to-alls, and saves its outputs
(or the error it raised) to OUT with ``torch.save``.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta


def main(rank: int, world: int, port: int, out: str, spec: dict) -> None:
    import torch
    import torch.distributed as dist

    from overlap.plan import Batch, Plan, build_plan, check_rank_symmetry, split, split_agreed
    from overlap.reference import TINY, ExpertParallel, ReferenceModel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        batches = [Batch.of(tuple(r) for r in b) for b in spec["batches"]]
        first_id = sum(len(b) for b in batches[:rank])
        first_token = sum(b.tokens for b in batches[:rank])
        batch = batches[rank]
        model = ReferenceModel(TINY, num_layers=3, ep=ExpertParallel.of(dist.group.WORLD))
        ids = range(first_id, first_id + len(batch))
        contexts = {rid: r.context_len for rid, r in zip(ids, batch.requests) if r.context_len}
        total = sum(b.tokens for b in batches)
        inputs = {k: v[first_token:first_token + batch.tokens]
                  for k, v in model.inputs(total).items()}

        def all_reduce_min(n: int) -> int:
            t = torch.tensor([n])
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            return int(t.item())

        options = {"split_requests": spec.get("split_requests", False)}
        s = (split_agreed(batch, spec["n"], all_reduce_min, **options) if spec["agree"]
             else split(batch, spec["n"], **options))
        plan = build_plan(spec["strategy"], model.model_graph(), s)
        gathered: list[str | None] = [None] * world
        dist.all_gather_object(gathered, plan.to_json())
        check_rank_symmetry([Plan.from_json(text) for text in gathered])
        step = model.step(plan.split, model.cache(contexts), request_ids=list(ids))
        result = model.run(plan, inputs, step, backend=spec.get("backend", "threads"))
        torch.save({**result, "n": plan.n_micro}, out)
    except Exception as exc:  # reported to the parent test, which asserts on it
        torch.save({"error": f"{type(exc).__name__}: {exc}"}, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]))
