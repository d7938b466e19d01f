"""Large-but-legal inputs stay fast: a one-million-request prefill through the CLI's path.

Each row runs ``overlap simulate --tokens N --requests N --no-plot`` in a fresh interpreter (the
real start-up, batch, split, plans, simulation and trace write) and reports its wall time, CPU
time and peak memory (max RSS). The target is under 10 s for one million requests with every
strategy; the machine this runs on may be shared, so the CPU time (user + system) is the less
disturbed figure.

    python benchmarks/bad_inputs.py [--requests 1000000] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import run_main

from overlap._atomic import write_json

ROOT = Path(__file__).resolve().parent.parent


def run_one(requests: int, strategy: str) -> dict:
    """One CLI run in a child process: wall seconds, CPU seconds, peak RSS in MB."""
    with tempfile.TemporaryDirectory() as out:
        argv = [sys.executable, "-m", "overlap", "simulate", "--tokens", str(requests),
                "--requests", str(requests), "--strategy", strategy, "--no-plot", "--out", out]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"benchmarks/bad_inputs.py: the run failed: {done.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    best = [line for line in done.stdout.splitlines() if line.startswith("best:")]
    return {"requests": requests, "strategy": strategy, "wall_s": wall, "cpu_s": cpu,
            "max_rss_mb": after.ru_maxrss / 1024, "best": best[0] if best else ""}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1_000_000, help="requests (one token each)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    args = p.parse_args()
    if args.requests < 1:
        raise SystemExit(f"{sys.argv[0]}: error: '--requests' must be >= 1 (got {args.requests})")
    rows = [run_one(args.requests, s) for s in ("sequential", "all")]
    print(f"{'requests':>9}  {'strategy':10}  {'wall s':>7}  {'cpu s':>7}  {'max RSS MB':>10}")
    for r in rows:
        print(f"{r['requests']:9d}  {r['strategy']:10}  {r['wall_s']:7.2f}  {r['cpu_s']:7.2f}  "
              f"{r['max_rss_mb']:10.0f}")
    print(rows[-1]["best"])
    if args.json:
        write_json(args.json, {"rows": rows}, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
