"""One rank of the data-parallel decision test (run as a script by tests/test_decide.py).

Usage: ``python decide_worker.py RANK WORLD PORT OUT SPEC`` where SPEC is JSON:
``{"batches": [[[q, ctx], ...] or null per rank]}``. The rank joins a gloo group on localhost,
decides its own batch with ``Planner.decide`` agreed by a real MAX all-reduce, builds the plan
for its batch and writes what it decided and its collective order as JSON to OUT.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta


def main(rank: int, world: int, port: int, out: str, spec: dict) -> None:
    import torch
    import torch.distributed as dist

    from overlap.ops_graph.templates import ParallelConfig
    from overlap.plan import Batch, collective_order
    from overlap.search import Planner

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        local = spec["batches"][rank]
        batch = None if local is None else Batch.of(tuple(r) for r in local)
        planner = Planner("deepseek-v3", ParallelConfig(ep=32), "h800", num_layers=8)

        def agree(values):
            t = torch.tensor(list(values), dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return t.tolist()

        decision = planner.decide(batch, agree=agree)
        result = {"choice": decision.choice.describe(), "n": decision.n_micro,
                  "off": decision.off, "key": list(decision.key), "reason": decision.reason}
        if batch is not None:
            plan = planner.plan_for(decision, batch)
            result["order"] = {g: [list(c) for c in seq] for g, seq in collective_order(plan).items()}
        with open(out, "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, port, out, spec = sys.argv[1:6]
    main(int(rank), int(world), int(port), out, json.loads(spec))
