"""Simulator fidelity against DeepSeek's public profile: per-role error, layer period, overlap.

The trace is ``train.json`` of github.com/deepseek-ai/profile-data (H800, EP64 TP1, DeepGEMM
FP8, DeepEP normal kernels, 4096-token microbatches; one DualPipe forward chunk of 4 MoE layers
overlapped with a backward chunk). Without a path the committed excerpt
``tests/data/deepseek-train-kernels.json.gz`` (its kernels, annotations and launches, cut by
``tools/trace_excerpt.py``) is used, so this runs offline.

1. **Per role.** Kernels are mapped to the DeepSeek template's fine ops (``overlap.cost.traces``)
   and summed per (layer, op); the simulator prices the same ops for DeepSeek-V3 on ``h800`` at
   EP64, fp8, one 4096-token prefill microbatch, compute on the 112 SMs DeepSeek's kernels are
   launched on (DeepEP keeps 20; ``--reserved-sms``). Ratios predicted/measured per op role, before
   calibration and after fitting one factor per role on half the layers, checked on the other
   half, for two halvings (first/second, alternating), each with its noise floor: the measured
   fit-layer mean over the test-layer mean. The prediction is the same for every layer, so the
   held-out error of a per-role factor equals that floor.
   DeepEP's kernels per layer (transfer vs notify) and the transfer kernels against the model
   and against the time DeepEP's published EP64 bandwidth implies for the same shape.
2. **Replay.** The trace's own schedule is replayed on a virtual clock: each (annotation, layer)
   on each stream is one step, streams run their steps in the measured order, and a step waits
   for the previous step of its chain (forward: attn -> dispatch -> mlp -> combine -> next
   layer's attn; backward: combine -> mlp -> dispatch -> attn; a W step after its B step). Step
   times are the measured kernel time (backward: always, it has no op in the graph) or the
   simulator's prediction for the forward ops in it (uncalibrated / calibrated). The layer
   period (forward attn to the next forward attn) and the share of comm time hidden under
   compute are compared with the measured trace. Contention between the streams is not
   modelled in the replay: measured kernel times already contain it, predictions do not.

``python benchmarks/fidelity.py [TRACE] [--json PATH] [--gantt PNG]``
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict
from pathlib import Path

from _common import run_main

from overlap._atomic import write_json
from overlap.backends.simulated import step_work
from overlap.backends.timeline import Span, Timeline, covered, kernel_timeline, uncovered
from overlap.cost import fit_roles, get_hardware
from overlap.cost.collectives import fanout
from overlap.cost.traces import KernelProfile, profile, read_kernel_trace
from overlap.ops_graph import Routing
from overlap.ops_graph.templates import ParallelConfig, build_model
from overlap.plan import Batch, build_plan, split

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "data" / "deepseek-train-kernels.json.gz"
CHAINS = {"F": ("attn", "dispatch", "mlp", "combine"), "B": ("combine", "mlp", "dispatch", "attn")}
GOALS = {"uncalibrated": 1.5, "calibrated": 0.15, "period": 0.10, "hidden_points": 5.0}
SPLITS = ("halves", "alternating")


def predicted_ops(tokens: int, hardware: str, reserved_sms: int = 0
                  ) -> tuple[dict[str, float], dict[str, str], Routing]:
    """Seconds and role of each op of one DeepSeek-V3 MoE layer (EP64, fp8, one microbatch),
    and the dispatch's routing; compute ops on the SMs left after ``reserved_sms`` (the
    roofline scales by that share)."""
    model = build_model("deepseek-v3", ParallelConfig(ep=64), phase="prefill", attention="fine",
                        dtype="fp8", num_layers=4)  # layers 0-2 dense, 3 MoE
    plan = build_plan("sequential", model, split(Batch.prefill(tokens, 1), 1))
    hw = get_hardware(hardware)
    share = 1.0 - reserved_sms / hw.compute_units
    seconds, roles = {}, {}
    for step, work in zip(plan.steps, step_work(plan, hw)):
        if step.layer == 3:
            seconds[step.op] = work.seconds / (share if work.kind == "compute" else 1.0)
            roles[step.op] = model.layers[3][step.op].role
    return seconds, roles, model.layers[3]["dispatch"].comm.routing


def split_layers(layers: list[int], how: str) -> tuple[list[int], list[int]]:
    """(fit, test) layers: ``halves`` = first half / second half, ``alternating`` = even /
    odd positions (a trend along the layers then falls on both sides)."""
    if len(layers) < 2:
        return layers, layers
    if how == "halves":
        half = len(layers) // 2
        return layers[:half], layers[half:]
    return layers[0::2], layers[1::2]


def _per_role(prof: KernelProfile, roles: dict[str, str], layers: list[int]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (_, op), s in prof.op_seconds(layers).items():
        out[roles[op]] += s / len(layers)
    return out


def role_table(prof: KernelProfile, pred: dict[str, float], roles: dict[str, str],
               splits: dict[str, tuple[list[int], list[int]]]
               ) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Per role: measured (mean over all layers) vs predicted, and per split the factor fitted
    on its fit layers, the ratio it gives on the test layers, and the noise floor: the measured
    fit-layer mean over the test-layer mean, minus 1. With one factor per role and the same
    prediction for every layer, ``after - 1`` *is* the floor: no per-role factor does better."""
    all_on = _per_role(prof, roles, list(prof.layers))
    measured_ops = {op for (_, op) in prof.op_seconds()}
    predicted: dict[str, float] = defaultdict(float)
    for op, s in pred.items():
        if op in measured_ops:
            predicted[roles[op]] += s
    factors, held = {}, {}
    for name, (fit_on, test_on) in splits.items():
        factors[name] = fit_roles({op: ("compute", s) for op, s in pred.items()},
                                  prof.measurements(fit_on), roles)
        held[name] = (_per_role(prof, roles, fit_on), _per_role(prof, roles, test_on))
    rows = []
    for role in sorted(predicted, key=lambda r: -all_on[r]):
        p, m = predicted[role], all_on[role]
        row = {"role": role, "measured_us": m * 1e6, "predicted_us": p * 1e6, "ratio_before": p / m,
               "splits": {}}
        for name in splits:
            fit_m, test_m = held[name][0][role], held[name][1][role]
            f = factors[name][role]
            row["splits"][name] = {"factor": f, "ratio_after": p * f / test_m,
                                   "floor": fit_m / test_m - 1}
        rows.append(row)
    return rows, factors


# -- DeepEP kernels ----------------------------------------------------------------------------------

# DeepEP V1 README (docs/legacy.md), internode normal kernels on H800, EP64: bottleneck RDMA
# bandwidth of its own benchmark (4096 tokens, hidden 7168, top-8 of 256 in 4 node groups),
# counted as (token, destination node) pairs including the sender's own node.
DEEPEP_EP64_GBPS = {"dispatch": 51.0, "combine": 50.0}
PAYLOAD = {"dispatch": 7168 * (1 + 4 / 128), "combine": 7168 * 2}  # FP8 + scales, BF16


def deepep_kernels(prof: KernelProfile) -> dict[str, list[float]]:
    """Seconds of each DeepEP normal-mode kernel class, per layer: forward/backward transfer
    kernels (the backward chunk's run in cached mode: no host sync before their launch) and
    the notify/layout kernels of the forward ops."""
    out: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for m in prof.kernels:
        name, seg = m.kernel.name, m.segment or ""
        if m.layer is None or not re.search(r"ep::(internode|intranode)::|get_dispatch_layout", name):
            continue
        kind = "dispatch" if re.search(r"::dispatch<", name) else "combine" if re.search(
            r"::combine<", name) else None
        if kind is None:
            if seg.endswith("(F)") and m.op in ("dispatch", "combine"):
                out[f"{m.op} notify (F)"][m.layer] += m.kernel.dur_us * 1e-6
            continue
        direction = "F" if seg.endswith("(F)") else "B"
        out[f"{kind} transfer ({direction})"][m.layer] += m.kernel.dur_us * 1e-6
    return {k: [v[layer] for layer in sorted(v)] for k, v in sorted(out.items())}


def published_rate_s(kind: str, tokens: int, nodes_per_token: float) -> float:
    """The time DeepEP's published EP64 bandwidth implies for ``tokens`` tokens (its metric:
    token-node pairs including the own node, times the payload)."""
    return tokens * nodes_per_token * PAYLOAD[kind] / (DEEPEP_EP64_GBPS[kind] * 1e9)


# -- replay ------------------------------------------------------------------------------------------


def replay_steps(prof: KernelProfile) -> list[dict]:
    """One step per (segment, layer, stream): its kernels' summed time, and per op how much."""
    steps: dict[tuple, dict] = {}
    for m in prof.kernels:
        if m.segment is None or m.layer is None:
            continue
        key = (m.segment, m.layer, m.kernel.stream)
        step = steps.setdefault(key, {"segment": m.segment, "layer": m.layer,
                                      "stream": m.kernel.stream, "start": m.kernel.start_us,
                                      "measured": 0.0, "ops": defaultdict(float)})
        step["measured"] += m.kernel.dur_us * 1e-6
        step["start"] = min(step["start"], m.kernel.start_us)
        step["end"] = max(step.get("end", 0.0), m.kernel.end_us)
        if m.op is not None:
            step["ops"][m.op] += m.kernel.dur_us * 1e-6
        step["comm"] = m.kernel.stream in prof.comm_streams
    return sorted(steps.values(), key=lambda s: s["start"])


def _chain_key(segment: str) -> tuple[str, str] | None:
    if len(segment) > 3 and segment.endswith(")") and segment[-3] == "(":
        return segment[:-3], segment[-2]
    return None


def replay(prof: KernelProfile, steps: list[dict], op_seconds: dict[str, float] | None
           ) -> Timeline:
    """Play ``steps`` on a virtual clock (see the module doc); ``op_seconds``: predicted seconds
    per op for the forward steps (None: measured times everywhere)."""
    measured_op = prof.op_seconds()
    n = len(steps)
    dur = []
    for s in steps:
        if op_seconds is None or not s["ops"]:
            dur.append(s["measured"])
            continue
        # An op's prediction is split over its steps in proportion to its measured kernel time;
        # the step's unmapped kernels keep their measured time.
        t = s["measured"] - sum(s["ops"].values())
        for op, sec in s["ops"].items():
            share = sec / measured_op[(s["layer"], op)]
            t += op_seconds[op] * share if op in op_seconds else sec
        dur.append(t)
    # Dependencies: stream FIFO plus the chain of each direction.
    deps: list[set[int]] = [set() for _ in range(n)]
    last_on: dict = {}
    by_seg: dict[tuple[str, str, int], list[int]] = defaultdict(list)
    for i, s in enumerate(steps):
        if s["stream"] in last_on:
            deps[i].add(last_on[s["stream"]])
        last_on[s["stream"]] = i
        key = _chain_key(s["segment"])
        if key:
            by_seg[(*key, s["layer"])].append(i)
    for i, s in enumerate(steps):
        key = _chain_key(s["segment"])
        if not key:
            continue
        base, direction = key
        layer = s["layer"]
        if direction == "W":
            deps[i] |= set(by_seg.get((base, "B", layer), ()))
            continue
        chain = CHAINS.get(direction)
        if not chain or base not in chain:
            continue
        k = chain.index(base)
        prev = (chain[k - 1], direction, layer if k > 0 else layer - 1)
        deps[i] |= set(by_seg.get(prev, ()))
    deps = [{d for d in ds if d < i} for i, ds in enumerate(deps)]
    start, end = [0.0] * n, [0.0] * n
    for i in range(n):  # steps are in a topological order (measured start order)
        start[i] = max((end[d] for d in deps[i]), default=0.0)
        end[i] = start[i] + dur[i]
    streams = [*prof.compute_streams, *prof.comm_streams]
    index = {s: i for i, s in enumerate(streams)}
    spans = [Span(s["layer"], 0, s["segment"], index[s["stream"]], start[i], end[i],
                  "comm" if s["comm"] else "compute") for i, s in enumerate(steps)]
    return Timeline("replay", [str(s) for s in streams], spans, device="h800 (replay)")


def as_measured(prof: KernelProfile, steps: list[dict]) -> Timeline:
    """The same steps where the trace ran them (first kernel start to last kernel end)."""
    streams = [*prof.compute_streams, *prof.comm_streams]
    index = {s: i for i, s in enumerate(streams)}
    t0 = min(s["start"] for s in steps)
    spans = [Span(s["layer"], 0, s["segment"], index[s["stream"]], (s["start"] - t0) * 1e-6,
                  (s["end"] - t0) * 1e-6, "comm" if s["comm"] else "compute") for s in steps]
    return Timeline("trace", [str(s) for s in streams], spans, device="h800", measured=True)


def period(tl: Timeline, segment: str = "attn(F)") -> float:
    """Mean time between consecutive starts of ``segment`` (a span name, or a ``~role``/op)."""
    starts = sorted({s.layer: s.start for s in reversed(tl.spans) if s.op == segment}.values())
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    return statistics.fmean(gaps) if gaps else float("nan")


def hidden(tl: Timeline) -> float:
    """Share of comm busy time during which some compute runs."""
    comm = [(s.start, s.end) for s in tl.spans if s.kind == "comm"]
    compute = [(s.start, s.end) for s in tl.spans if s.kind != "comm"]
    busy = covered(comm)
    return 1.0 - uncovered(comm, compute) / busy if busy else float("nan")


def measured_period(prof: KernelProfile) -> float:
    """Mean time between the first kernels of consecutive forward attention segments."""
    first: dict[int, float] = {}
    for m in prof.kernels:
        if m.segment == "attn(F)" and m.layer is not None:
            first.setdefault(m.layer, m.kernel.start_us * 1e-6)
    starts = [first[k] for k in sorted(first)]
    return statistics.fmean(b - a for a, b in zip(starts, starts[1:]))


def _fmt_split(d: dict) -> str:
    return f"{d['factor']:7.2f} {d['ratio_after']:6.2f} {d['floor']:+7.1%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", default=str(FIXTURE),
                        help="profiler trace (default: the committed excerpt of train.json)")
    parser.add_argument("--hardware", default="h800")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per microbatch per rank")
    parser.add_argument("--reserved-sms", type=int, default=20,
                        help="SMs the trace's compute kernels leave to DeepEP (its GEMM grids are "
                             "112 of 132 SMs wide; default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--gantt", metavar="PNG", help="measured vs replayed (calibrated) picture")
    args = parser.parse_args(argv)

    prof = profile(read_kernel_trace(args.trace))
    layers = list(prof.layers)
    splits = {how: split_layers(layers, how) for how in SPLITS}
    pred, roles, routing = predicted_ops(args.tokens, args.hardware, args.reserved_sms)
    rows, factors = role_table(prof, pred, roles, splits)
    calibrated = {how: {op: s * factors[how].get(roles[op], 1.0) for op, s in pred.items()}
                  for how in SPLITS}

    measured_tl = kernel_timeline(prof)
    steps = replay_steps(prof)
    replays = {"measured times": replay(prof, steps, None),
               "uncalibrated": replay(prof, steps, pred),
               **{f"calibrated ({how})": replay(prof, steps, calibrated[how]) for how in SPLITS}}
    m_period, m_hidden = measured_period(prof), hidden(measured_tl)

    print(f"fidelity: {args.trace} ({len(prof.kernels)} kernels, layers {layers}); simulator "
          f"{args.hardware}, DeepSeek-V3 EP64 fp8, {args.tokens}-token microbatch")
    heads = "  ".join(f"{how} {fit}->{test}".ljust(22) for how, (fit, test) in splits.items())
    print("per role (measured: mean of all layers; per split: factor fitted on the first layers, "
          "predicted/measured after it on the others, and the measured floor = fit-layer mean / "
          "test-layer mean - 1)")
    print(f"  {'':<11} {'':>11} {'':>12} {'':>9}   {heads}")
    cols = "  ".join(f"{'factor':>7} {'after':>6} {'floor':>7}" for _ in SPLITS)
    print(f"  {'role':<11} {'measured_us':>11} {'predicted_us':>12} {'pred/meas':>9}   {cols}")
    for r in rows:
        print(f"  {r['role']:<11} {r['measured_us']:11.1f} {r['predicted_us']:12.1f} "
              f"{r['ratio_before']:9.2f}   " + "  ".join(_fmt_split(r["splits"][h]) for h in SPLITS))
    worst_before = max(max(r["ratio_before"], 1 / r["ratio_before"]) for r in rows)
    worst = {h: max(abs(r["splits"][h]["ratio_after"] - 1) for r in rows) for h in SPLITS}
    floor = {h: max(abs(r["splits"][h]["floor"]) for r in rows) for h in SPLITS}
    print(f"  worst uncalibrated ratio {worst_before:.2f}x (goal <= {GOALS['uncalibrated']}x)")
    for h in SPLITS:
        print(f"  worst calibrated error on held-out layers, {h}: {worst[h]:.1%} (goal <= "
              f"{GOALS['calibrated']:.0%}; measured floor {floor[h]:.1%})")

    kernels = deepep_kernels(prof)
    print("DeepEP kernels per layer (us) and their floor per split:")
    for name, per_layer in kernels.items():
        floors = []
        for fit, test in splits.values():
            a = statistics.fmean(per_layer[layers.index(x)] for x in fit)
            b = statistics.fmean(per_layer[layers.index(x)] for x in test)
            floors.append(f"{a / b - 1:+7.1%}")
        print(f"  {name:<22} " + " ".join(f"{t * 1e6:7.0f}" for t in per_layer) + "   "
              + "  ".join(floors))
    nodes_hit, ranks_hit = fanout(routing, 64, get_hardware(args.hardware).devices_per_node)
    print(f"DeepEP transfer kernels vs the model and DeepEP's own benchmark (EP64, {args.tokens} "
          f"tokens, {nodes_hit:.2f} nodes / {ranks_hit:.2f} ranks per token):")
    print(f"  {'kernel':<22} {'measured_us':>11} {'model_us':>9} {'benchmark_us':>12} "
          f"{'meas/model':>10} {'meas/bench':>10}")
    deepep = {}
    for name, per_layer in kernels.items():
        if "transfer" not in name:
            continue
        kind = name.split()[0]
        t, model, bench = statistics.fmean(per_layer), pred[kind], published_rate_s(
            kind, args.tokens, nodes_hit)
        deepep[name] = {"measured_s": t, "model_s": model, "benchmark_s": bench}
        print(f"  {name:<22} {t * 1e6:11.0f} {model * 1e6:9.0f} {bench * 1e6:12.0f} "
              f"{t / model:10.2f} {t / bench:10.2f}")

    print("replay of the trace's schedule:")
    print(f"  {'':<24} {'period_ms':>9} {'vs meas':>8} {'hidden':>7} {'vs meas':>8}")
    print(f"  {'measured trace':<24} {m_period * 1e3:9.2f} {'':>8} {m_hidden:7.1%}")
    out_replays = {}
    for name, tl in replays.items():
        p, h = period(tl), hidden(tl)
        out_replays[name] = {"period_s": p, "hidden": h}
        print(f"  {name:<24} {p * 1e3:9.2f} {p / m_period - 1:+8.1%} {h:7.1%} "
              f"{(h - m_hidden) * 100:+7.1f}pt")
    out_replays["calibrated"] = out_replays["calibrated (halves)"]
    if args.gantt:
        from overlap.report import gantt_pair

        seg_measured = as_measured(prof, steps)
        chosen = replays["calibrated (halves)"]
        gantt_pair(seg_measured, chosen, args.gantt,
                   window=(0.0, max(seg_measured.makespan, chosen.makespan)),
                   title="DeepSeek train.json: measured (segments) vs calibrated replay")
        print(f"wrote {args.gantt}")
    if args.json:
        write_json(args.json, {"trace": args.trace, "layers": layers,
                               "splits": {h: {"fit": f, "test": t} for h, (f, t) in splits.items()},
                               "roles": rows, "worst_calibrated": worst, "floor": floor,
                               "deepep_kernels": kernels, "deepep": deepep,
                               "fanout": {"nodes": nodes_hit, "ranks": ranks_hit},
                               "measured": {"period_s": m_period, "hidden": m_hidden},
                               "replays": out_replays}, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
