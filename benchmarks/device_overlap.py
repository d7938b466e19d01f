"""Measured vs predicted: GEMMs on the compute stream overlapping copies on the comm stream.

The simulator is only useful if its predictions track real hardware. This benchmark runs a
synthetic MoE-shaped layer — ``attn`` (GEMMs) -> ``dispatch`` (a copy) -> ``experts`` (GEMMs)
-> ``combine`` (a copy) — under several strategies on a real device, and compares the measured
step time with the simulator's prediction for the same Plan.

The copies stand in for collectives on one device. On an accelerator (``torch_streams``) each
comm op copies its microbatch's payload to pinned host memory and back: DMA copy engines, no
compute units, so the simulated ``comm_compute_share`` is 0. On CPU (``threads``) the two
streams are two worker threads and GEMMs use one torch thread. There ``--comm sleep`` (the
default) waits as long as a transfer at ``--link-gbps`` would take, the way a thread waits on a
NIC that does the moving; ``--comm copy`` does a memcpy instead, which competes with the GEMMs for
memory bandwidth and cache — contention the simulator's CPU-less link model does not include.

The hardware model is calibrated first from the device itself: one GEMM op and one copy op of
the whole batch, timed alone, give the matrix throughput and the link bandwidth the simulator
uses. Everything else (microbatch sizes, overlap, contention) is predicted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from overlap._atomic import write_json
from overlap._optional import require
from overlap.backends.executor import Executor
from overlap.backends.simulated import simulate
from overlap.cost import get_hardware
from overlap.ops_graph import Collective, Formula, GraphBuilder, ModelGraph, OpCost, Role
from overlap.plan import Batch, build_plan, split

STRATEGIES = ("sequential", "ascend_dbo", "vllm_dbo", "deepseek_prefill")


def layer_graph(dim: int, reps: int, payload_per_token: int):
    """The synthetic layer: flops and bytes per token, the names strategies schedule by."""
    gemm = OpCost(flops=Formula(per_token=2.0 * dim * dim * reps))
    comm = OpCost(comm_bytes=Formula(per_token=float(payload_per_token)))
    b = GraphBuilder("synthetic", "x")
    b.compute("attn", "x", "h", cost=gemm, role=Role.ATTN)
    b.comm("dispatch", Collective.ALL_TO_ALL, "ep", "h", "r", size=2, cost=comm, role=Role.DISPATCH)
    b.compute("experts", "r", "e", cost=gemm, role=Role.EXPERTS)
    b.comm("combine", Collective.ALL_TO_ALL, "ep", "e", "y", size=2, cost=comm, role=Role.COMBINE)
    return b.build("y")


class Ops:
    """The callables: repeated GEMMs, and a copy of ``payload`` bytes per row out and back."""

    def __init__(self, torch, device, dtype, dim: int, reps: int, payload_per_token: int,
                 comm: str = "copy", link_gbps: float = 10.0) -> None:
        self.torch, self.device, self.reps = torch, device, reps
        self.comm, self.link_gbps = comm, link_gbps
        self.weight = torch.randn(dim, dim, device=device, dtype=dtype) / dim ** 0.5
        self.payload_per_token = payload_per_token
        self._buffers: dict[int, tuple] = {}

    def gemm(self, x):
        for _ in range(self.reps):
            x = x @ self.weight
        return x

    def copy(self, x):
        """Move ``rows * payload`` bytes to the host and back; the value passes through."""
        if self.comm == "sleep":
            time.sleep(x.shape[0] * self.payload_per_token / (self.link_gbps * 1e9))
            return x
        src, host, back = self._buffer(x.shape[0])
        host.copy_(src, non_blocking=True)
        back.copy_(host, non_blocking=True)
        return x

    def _buffer(self, rows: int) -> tuple:
        if rows not in self._buffers:  # allocated once per microbatch size, outside timing
            t, n = self.torch, max(1, rows * self.payload_per_token)
            on_device = self.device.type != "cpu"
            self._buffers[rows] = (t.zeros(n, dtype=t.uint8, device=self.device),
                                   t.zeros(n, dtype=t.uint8, pin_memory=on_device),
                                   t.zeros(n, dtype=t.uint8, device=self.device))
        return self._buffers[rows]

    def bind(self, graph):
        return graph.bind({"attn": self.gemm, "experts": self.gemm,
                           "dispatch": self.copy, "combine": self.copy})


def timed(fn, sync, repeats: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def calibrate(ops: Ops, x, sync, repeats: int, base):
    """The hardware model fitted to this device: matrix rate and copy bandwidth of the whole batch."""
    rows, dim = x.shape
    gemm_s = timed(lambda: ops.gemm(x), sync, repeats)
    copy_s = timed(lambda: ops.copy(x), sync, repeats)
    tflops = 2.0 * dim * dim * ops.reps * rows / gemm_s / 1e12
    # An all_to_all of S bytes over 2 ranks in one node moves S/2 over the link.
    link_gbps = rows * ops.payload_per_token / 2 / copy_s / 1e9
    hw = base.evolve(name=f"calibrated-{base.name}", bf16_tflops=tflops, matrix_efficiency=1.0,
                     intra_link_gbps=link_gbps, intra_link_efficiency=1.0, intra_latency_s=1e-6,
                     devices_per_node=8, comm_compute_share=0.0, launch_overhead_s=2e-6)
    return hw, gemm_s, copy_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=None,
                        help="batch rows (default 8192 on an accelerator, 512 on CPU)")
    parser.add_argument("--dim", type=int, default=None, help="GEMM size (default 4096 / 384)")
    parser.add_argument("--reps", type=int, default=2, help="GEMMs per compute op (default 2)")
    parser.add_argument("--payload", type=int, default=None,
                        help="bytes copied per token by each comm op (default 16384 / 49152)")
    parser.add_argument("--layers", type=int, default=8, help="layers (default 8)")
    parser.add_argument("--repeats", type=int, default=11, help="timed runs per row (default 11)")
    parser.add_argument("--comm", choices=("copy", "sleep"), default=None,
                        help="what a comm op does: copy (default on an accelerator) or sleep "
                             "(default on CPU: a transfer that occupies no core)")
    parser.add_argument("--link-gbps", type=float, default=10.0,
                        help="transfer rate of --comm sleep, GB/s (default 10)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    # Sizes are checked before torch is required, so a bad flag is reported even without torch.
    for name in ("tokens", "dim", "reps", "payload", "layers", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"{sys.argv[0]}: error: '--{name}' must be >= 1 (got {value})")
    if args.link_gbps <= 0:
        raise SystemExit(f"{sys.argv[0]}: error: '--link-gbps' must be > 0 (got {args.link_gbps})")

    # One OpenMP thread in every thread (set before torch loads: torch.set_num_threads only
    # reaches the calling thread's OpenMP pool, not the backend's worker threads).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch = require("torch", purpose="benchmarks/device_overlap.py")
    accel = torch.accelerator.is_available() if hasattr(torch, "accelerator") else False
    if accel:
        device = torch.device(torch.accelerator.current_accelerator().type)
        backend, dtype, base = "torch_streams", torch.bfloat16, get_hardware("h100")
        defaults = (8192, 4096, 16384)

        def sync() -> None:
            torch.accelerator.synchronize()
    else:
        device = torch.device("cpu")
        backend, dtype, base = "threads", torch.float32, get_hardware("h100")
        defaults = (512, 384, 49152)

        def sync() -> None:
            pass

    tokens, dim, payload = (d if v is None else v
                            for v, d in zip((args.tokens, args.dim, args.payload), defaults))
    comm = args.comm or ("copy" if accel else "sleep")
    torch.manual_seed(0)
    ops = Ops(torch, device, dtype, dim, args.reps, payload, comm, args.link_gbps)
    x = torch.randn(tokens, dim, device=device, dtype=dtype)
    hw, gemm_s, copy_s = calibrate(ops, x, sync, args.repeats, base)
    graph = layer_graph(dim, args.reps, payload)
    model = ModelGraph("synthetic", [graph] * args.layers)
    bound = [ops.bind(graph)] * args.layers
    batch = Batch.prefill(tokens, 8)

    rows = []
    for strategy in STRATEGIES:
        plan = build_plan(strategy, model, split(batch, 2))
        predicted = simulate(plan, hw).makespan
        with Executor(plan, backend) as executor:
            measured = timed(lambda executor=executor: executor.run({"x": x}, layers=bound),
                             sync, args.repeats)
        rows.append({"strategy": strategy, "measured_ms": measured * 1e3,
                     "predicted_ms": predicted * 1e3,
                     "error": (predicted - measured) / measured})
    seq = rows[0]
    for r in rows:
        r["measured_speedup"] = seq["measured_ms"] / r["measured_ms"]
        r["predicted_speedup"] = seq["predicted_ms"] / r["predicted_ms"]

    print(f"device: {device} ({backend}), {tokens} tokens x {dim}, {args.reps} GEMMs per op, "
          f"comm = {comm} of {payload} B/token, {args.layers} layers, median of {args.repeats}")
    print(f"calibration: one GEMM op {gemm_s * 1e3:.2f} ms ({hw.bf16_tflops:.2f} TFLOP/s), "
          f"one copy op {copy_s * 1e3:.2f} ms")
    header = ("strategy", "measured ms", "predicted ms", "error", "measured x", "predicted x")
    print("  ".join(f"{h:>16}" for h in header))
    for r in rows:
        print(f"{r['strategy']:>16}  {r['measured_ms']:16.2f}  {r['predicted_ms']:16.2f}  "
              f"{r['error']:+16.1%}  {r['measured_speedup']:15.2f}x  {r['predicted_speedup']:15.2f}x")
    if args.json:
        write_json(args.json, {"device": str(device), "backend": backend, "comm": comm,
                               "tokens": tokens, "dim": dim,
                               "reps": args.reps, "payload_per_token": payload,
                               "layers": args.layers, "gemm_s": gemm_s, "copy_s": copy_s,
                               "rows": rows}, indent=1)
    return 0


if __name__ == "__main__":
    from _common import run_main

    raise SystemExit(run_main(main))
