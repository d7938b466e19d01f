"""Time to build and validate a plan for full 61-layer DeepSeek-V3, per named strategy.

Two cases: EP16 prefill of 16k tokens (4 prompts, coarse attention) and EP16 decode (128
requests at 4k context, two-stage attention). Each timing is the median over ``--repeats``
fresh builds (nothing is reused between repeats), and the fastest repeat, which is less
disturbed by other load on a shared machine. The target is < 5 ms per plan.

    python benchmarks/plan_build.py [--repeats 30] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import run_main

from overlap._atomic import write_json
from overlap.ops_graph.templates import ParallelConfig, build_model
from overlap.plan import NAMED, Batch, build_plan, split

CASES = {
    "prefill EP16 16k": ("prefill", "one", Batch.prefill(16384, 4)),
    "decode EP16 128x4k": ("decode", "two_stage", Batch.decode(128, 4096)),
}


def measure(repeats: int) -> list[dict]:
    """One row per (case, strategy): median build and build+validate times in milliseconds."""
    rows = []
    for case, (phase, attention, batch) in CASES.items():
        model = build_model("deepseek-v3", ParallelConfig(ep=16), phase=phase, attention=attention)
        s = split(batch, 2)
        for name in NAMED:  # auto is a search, timed by benchmarks/strategies.py
            build, total = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                plan = build_plan(name, model, s, check=False)
                t1 = time.perf_counter()
                build_plan(name, model, s)
                t2 = time.perf_counter()
                build.append((t1 - t0) * 1e3)
                total.append((t2 - t1) * 1e3)
            rows.append({"case": case, "strategy": name, "steps": len(plan.steps),
                         "build_ms": statistics.median(build),
                         "build_validate_ms": statistics.median(total),
                         "build_validate_min_ms": min(total)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows = measure(args.repeats)
    print(f"{'case':20} {'strategy':24} {'steps':>6} {'build ms':>9} {'+validate ms':>13} "
          f"{'(min)':>7}")
    for r in rows:
        print(f"{r['case']:20} {r['strategy']:24} {r['steps']:6d} {r['build_ms']:9.2f} "
              f"{r['build_validate_ms']:13.2f} {r['build_validate_min_ms']:7.2f}")
    worst = max(r["build_validate_ms"] for r in rows)
    print(f"worst build+validate: {worst:.2f} ms (target < 5 ms)")
    if args.json:
        write_json(args.json, {"repeats": args.repeats, "rows": rows}, indent=1)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
