"""Host overhead of the executor: time per (microbatch, op) it adds over calling the ops directly.

The model is the 61-layer DeepSeek-V3 graph with trivial callables, so what is timed is the
executor's own bookkeeping (reading and writing value slots, freeing, issuing to the backend),
not the ops. Rows:

* ``direct``: the same op callables called in a flat loop with prebuilt arguments (the floor);
* ``inline executor``: a whole ``Executor.run`` on the inline backend, minus ``direct``, per step;
* ``threads executor``: the same on the threads backend (hand-off, events, worker wake-ups);
* ``... recording``: the same with ``Executor(record=True)`` (a host-clock span per step; the
  rows without it are recording off, which issues exactly what it did before recording existed);
* ``threads hand-off``: one ``submit`` of a no-op to a worker thread, drained;
* ``threads record+wait``: one event recorded on a stream and waited for on another.

Each figure is the median over ``--repeats`` runs. ``python benchmarks/host_overhead.py --json out.json``
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

from _common import run_main

from overlap._atomic import write_json
from overlap.backends import Executor, get_backend
from overlap.ops_graph import ModelGraph
from overlap.ops_graph.templates import ParallelConfig, build_model
from overlap.plan import Batch, Stream, build_plan, split

TARGET_US = 2.0


def trivial(n_writes: int) -> Callable[..., object]:
    result = tuple(range(n_writes)) if n_writes > 1 else 0
    return lambda *args: result


def bound_model(layers: int | None) -> ModelGraph:
    model = build_model("deepseek-v3", ParallelConfig(ep=16), num_layers=layers)
    bound = {id(g): g.bind({op.name: trivial(len(op.writes)) for op in g}) for g in model.distinct()}
    return ModelGraph(model.name, [bound[id(g)] for g in model.layers])


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (first run binds closures)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def direct_calls(plan) -> Callable[[], None]:
    calls = [(plan.model.layers[s.layer][s.op].fn, (0,) * len(plan.model.layers[s.layer][s.op].reads))
             for s in plan.steps]

    def run() -> None:
        for fn, args in calls:
            fn(*args)

    return run


def handoff(n: int) -> Callable[[], None]:
    backend = get_backend("threads")
    stream = backend.make_stream(Stream("compute", "compute"))

    def noop() -> None:
        pass

    def run() -> None:
        for _ in range(n):
            backend.submit(stream, noop, "noop")
        backend.synchronize()

    return run


def record_wait(n: int) -> Callable[[], None]:
    backend = get_backend("threads")
    a = backend.make_stream(Stream("compute", "compute"))
    b = backend.make_stream(Stream("comm", "comm"))

    def run() -> None:
        for _ in range(n):
            backend.wait(b, backend.record(a))
        backend.synchronize()

    return run


def measure(strategy: str, layers: int | None, repeats: int) -> list[dict]:
    model = bound_model(layers)
    plan = build_plan(strategy, model, split(Batch.prefill(64, 4), 2))
    steps = len(plan.steps)
    inputs = {name: list(range(64)) for name in model.layers[0].inputs}
    direct = median_time(direct_calls(plan), repeats)
    rows = [{"row": "direct op calls", "us_per_step": direct / steps * 1e6, "note": "floor"}]
    for name, record in (("inline", False), ("inline", True), ("threads", False), ("threads", True)):
        with Executor(plan, name, record=record) as ex:
            total = median_time(lambda ex=ex: ex.run(inputs, join=list), repeats)
        note = f"target <= {TARGET_US} us" if name == "inline" else "incl. hand-offs"
        rows.append({"row": f"{name} executor{', recording' if record else ''} (added)",
                     "us_per_step": (total - direct) / steps * 1e6,
                     "note": "timeline of every step" if record else note})
    n = 2000
    rows.append({"row": "threads hand-off", "us_per_step": median_time(handoff(n), repeats) / n * 1e6,
                 "note": "one submit, drained"})
    rows.append({"row": "threads record+wait", "us_per_step": median_time(record_wait(n), repeats) / n * 1e6,
                 "note": "per event pair"})
    for row in rows:
        row.update(strategy=strategy, steps=steps, micro=plan.n_micro, layers=plan.n_layers)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="deepseek_prefill")
    parser.add_argument("--layers", type=int, default=None, help="default: the model's 61")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows = measure(args.strategy, args.layers, args.repeats)
    head = rows[0]
    print(f"host overhead: {head['strategy']}, {head['layers']} layers x {head['micro']} microbatches "
          f"= {head['steps']} steps; median of {args.repeats}; {platform.processor() or platform.machine()}")
    width = max(len(r["row"]) for r in rows)
    print(f"  {'':{width}}  us/step  note")
    for r in rows:
        print(f"  {r['row']:{width}}  {r['us_per_step']:7.2f}  {r['note']}")
    if args.json:
        write_json(args.json, rows, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
