"""Time of ``Planner.decide`` per step: cold (a new bucket) and cached, for full DeepSeek-V3.

Targets (issue 12): <= 20 us when the bucket is cached, <= 50 ms cold. Per device (h800 EP32,
910b2 EP16), every bucket of decode at 1..1024 requests (4k context) and prefill at 1k..64k
tokens is decided cold once on a fresh Planner (its graphs already built, which an engine does
at start), then each is decided ``--repeats`` x 1000 times cached: through
``decide_shape(phase, tokens, requests, context)`` (the serving hot path: the engine knows its
step's figures) and through ``decide(batch)``, which also reads the figures off a Batch (once
per Batch object, per distinct request: the timed loop reuses one Batch, so a fresh Batch pays
one extra linear, C-level pass over its requests, not timed here). A two-rank data-parallel
agreement (``agree``: an in-process max) is timed too; with a real collective add its latency.

    python benchmarks/decide.py [--repeats 5] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

from _common import run_main

from overlap._atomic import write_json
from overlap.errors import ConfigError
from overlap.ops_graph.templates import ParallelConfig
from overlap.plan import Batch
from overlap.search import Planner

DEVICES = {"h800": ParallelConfig(ep=32), "910b2": ParallelConfig(ep=16)}
DECODE = (1, 8, 32, 128, 512, 1024)
PREFILL = (1024, 4096, 16384, 65536)
CONTEXT = 4096


def cases(quick: bool = False) -> list[tuple[str, int, int, int]]:
    """(phase, tokens, requests, context) of every timed step."""
    out = [("decode", n, n, CONTEXT) for n in (DECODE[2:3] if quick else DECODE)]
    return out + [("prefill", t, max(1, t // 4096), 0) for t in (PREFILL[:1] if quick else PREFILL)]


def batch_of(phase: str, tokens: int, requests: int, context: int) -> Batch:
    return Batch.decode(requests, context) if phase == "decode" else Batch.prefill(tokens, requests)


def _per_call(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def measure(repeats: int, quick: bool = False) -> list[dict]:
    """One row per (device, case); ``quick``: one device, two cases, 100 calls a timing."""
    rows = []
    calls_per = 100 if quick else 1000
    for hw, par in list(DEVICES.items())[:1 if quick else None]:
        planner = Planner("deepseek-v3", par, hw)
        for phase in ("decode", "prefill"):
            planner.model_graph(phase)  # the engine builds its graphs once, at start
        for phase, tokens, requests, context in cases(quick):
            t = time.perf_counter()
            decision = planner.decide_shape(phase, tokens, requests, context)
            cold = time.perf_counter() - t
            batch = batch_of(phase, tokens, requests, context)
            other = [0, 1, 1, 1, -1]  # a second rank with one decode token

            def agree(mine, other=other):
                return [max(a, b) for a, b in zip(mine, other)]

            figures = (phase, tokens, requests, context)
            calls = {"shape": partial(planner.decide_shape, *figures),
                     "batch": partial(planner.decide, batch),
                     "agreed": partial(planner.decide_shape, *figures, agree=agree)}
            times = {k: statistics.median(_per_call(f, calls_per) for _ in range(repeats))
                     for k, f in calls.items()}
            rows.append({"hardware": hw, "phase": phase, "tokens": tokens, "requests": requests,
                         "choice": decision.choice.describe(), "off": decision.off,
                         "cold_ms": cold * 1e3, "cached_shape_us": times["shape"] * 1e6,
                         "cached_batch_us": times["batch"] * 1e6,
                         "cached_agreed_us": times["agreed"] * 1e6})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one device, two cases (smoke run)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise ConfigError(f"'--repeats' must be >= 1 (got {args.repeats})")
    rows = measure(args.repeats, args.quick)
    print(f"{'hw':6} {'phase':8} {'tokens':>6} {'cold ms':>8} {'shape us':>9} {'batch us':>9} "
          f"{'agreed us':>10}  choice")
    for r in rows:
        print(f"{r['hardware']:6} {r['phase']:8} {r['tokens']:6d} {r['cold_ms']:8.1f} "
              f"{r['cached_shape_us']:9.2f} {r['cached_batch_us']:9.2f} "
              f"{r['cached_agreed_us']:10.2f}  {r['choice']}")
    # A planner's first decision also imports and warms the simulator: reported on its own.
    firsts = {r["hardware"]: r["cold_ms"] for r in reversed(rows)}
    cold = [r["cold_ms"] for i, r in enumerate(rows) if i and rows[i - 1]["hardware"] == r["hardware"]]
    hot = [r["cached_shape_us"] for r in rows]
    print(f"cold: first decision of a planner {', '.join(f'{v:.1f}' for v in firsts.values())} ms; "
          f"the other buckets median {statistics.median(cold or [0]):.1f} ms, max "
          f"{max(cold or [0]):.1f} ms (target <= 50); cached decide_shape: median "
          f"{statistics.median(hot):.2f} us, max {max(hot):.2f} us (target <= 20)")
    if args.json:
        write_json(args.json, {"repeats": args.repeats, "rows": rows}, indent=1)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
