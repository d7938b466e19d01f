"""The ``overlap`` command line: plan, simulate and compare microbatch overlap on CPU.

``overlap`` alone simulates every strategy for DeepSeek-V3 on an Ascend 910B2 EP16 prefill and
writes the best one's Gantt picture and Perfetto trace. Every user error ends as one line on
stderr and exit status 2, never a traceback. Nothing here imports torch; matplotlib is imported
only to draw the picture.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from overlap._atomic import write_json
from overlap.errors import MissingDependencyError, OverlapError

DEFAULT_OUT = "overlap-out"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas (got {text!r})") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer (got {text!r})")
    return values


def _microbatches(text: str) -> int:
    from overlap.plan.split import MAX_MICROBATCHES

    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 1 <= value <= MAX_MICROBATCHES:
        raise argparse.ArgumentTypeError(f"must be an integer in 1..{MAX_MICROBATCHES} (got {text!r})")
    return value


def _share(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] (got {text!r})") from None


def _scenario_flags(p: argparse.ArgumentParser, *, lists: bool = False, strategy: str = "all") -> None:
    num = _ints if lists else int
    many = " (comma list: one row per value)" if lists else ""
    g = p.add_argument_group("scenario")
    g.add_argument("--model", default="deepseek-v3",
                   help="preset (deepseek-v3, deepseek-r1, deepseek-v2, deepseek-v2-lite, "
                        "qwen3-moe-235b, qwen3-moe-30b) or a path to a HF config.json "
                        "(default: %(default)s)")
    g.add_argument("--hardware", default="910b2",
                   help="hardware preset: 910b2, 910b3, 910c, h100, h800, h20 (default: %(default)s)")
    g.add_argument("--phase", default="prefill", choices=("prefill", "decode"),
                   help="step kind (default: %(default)s)")
    g.add_argument("--tokens", type=num, default=None,
                   help=f"prefill tokens per rank (default: 16384); decode: the requests{many}")
    g.add_argument("--requests", type=num, default=None,
                   help=f"prefill: prompts sharing the tokens (default: 4); decode: requests "
                        f"(default: 256){many}")
    g.add_argument("--context", type=num, default=None,
                   help=f"cached tokens per request (default: 0 prefill, 4096 decode){many}")
    g.add_argument("--query-len", type=int, default=1, metavar="K",
                   help="decode: query tokens per request (MTP / speculative decoding; DeepSeek "
                        "decodes 2) (default: 1)")
    g.add_argument("--tp", type=num, default=1, help=f"tensor parallel size (default: 1){many}")
    g.add_argument("--ep", type=num, default=16, help=f"expert parallel size (default: 16){many}")
    g.add_argument("--dp", type=num, default=1, help=f"data parallel size (default: 1){many}")
    g.add_argument("--moe-comm", default="", choices=("all_to_all", "all_reduce", "all_gather"),
                   help="how MoE tokens move: all_to_all (EP), all_reduce (TP) or all_gather "
                        "(attention data-parallel, MoE TP) (default: all_to_all when --ep > 1, "
                        "else all_reduce)")
    g.add_argument("--dtype", default="bf16", choices=("bf16", "int8", "fp8"),
                   help="GEMM dtype; int8 is W8A8 (default: %(default)s)")
    from overlap.plan.strategies import GRAINS, STRATEGIES  # torch-free and small

    g.add_argument("--strategy", default=strategy,
                   help=f"a strategy name ({', '.join(STRATEGIES)}), a comma list, or 'all' "
                        "(default: %(default)s)")
    own = ", ".join(f"{s.grain} for {s.name}" for s in STRATEGIES.values() if s.grain != "one")
    g.add_argument("--attention", default=None, choices=GRAINS,
                   help=f"attention grain for every strategy (default: per strategy: {own}, "
                        "else one)")
    g.add_argument("--microbatches", type=_microbatches, default=2,
                   help="microbatch count (default: 2)")
    g.add_argument("--comm-mode", default=None, choices=("normal", "low_latency"),
                   help="all-to-all mode (default: low_latency for decode, else normal)")
    g.add_argument("--comm-share", type=_share, default=None,
                   help="fraction of compute units a running collective occupies "
                        "(default: the hardware's)")
    g.add_argument("--json", metavar="PATH", help="also write every printed figure as JSON to PATH")


def _scenario(args: argparse.Namespace, **override: Any):
    from overlap.search.scenario import Scenario

    fields = dict(model=args.model, hardware=args.hardware, phase=args.phase, tokens=args.tokens,
                  requests=args.requests, context=args.context, tp=args.tp, ep=args.ep, dp=args.dp,
                  moe_comm=args.moe_comm, dtype=args.dtype, attention=args.attention,
                  microbatches=args.microbatches, comm_mode=args.comm_mode,
                  comm_share=args.comm_share, query_len=args.query_len)
    fields.update(override)
    return Scenario(**fields)


def _write_json(args: argparse.Namespace, data: dict[str, Any]) -> None:
    if args.json:
        write_json(args.json, data, indent=1, sort_keys=True)


def _distinct_outputs(args: argparse.Namespace, other: str | Path, flag: str) -> None:
    """Refuse a ``--json`` that names the same file as another input or output of the command:
    one would overwrite the other."""
    if args.json and Path(args.json).resolve() == Path(other).resolve():
        raise OverlapError(f"'--json' and '{flag}' both name {str(other)!r}: give --json "
                           "another path")


def _one_strategy(args: argparse.Namespace) -> str:
    from overlap.search.scenario import strategy_names

    if args.strategy is None:
        return "deepseek_decode" if args.phase == "decode" else "deepseek_prefill"
    names = strategy_names(args.strategy)
    if len(names) != 1:
        raise OverlapError(f"'--strategy' must name one strategy here (got {args.strategy!r})")
    return names[0]


def _table(results) -> str:
    from overlap.report.tables import strategy_table

    ran = [r.metrics for r in results if r.metrics is not None]
    lines = [strategy_table(ran)] if ran else []
    lines += [f"{r.strategy}: not run: {r.error}" for r in results if r.error]
    return "\n".join(lines)


def _results_json(results) -> list[dict[str, Any]]:
    return [r.metrics.to_dict() if r.metrics else {"strategy": r.strategy, "error": r.error}
            for r in results]


def _cmd_simulate(args: argparse.Namespace) -> int:
    from overlap.report.trace import write_trace
    from overlap.search.scenario import best, compare

    scenario = _scenario(args)
    if args.plan:
        plan = _load_plan(args.plan)
        results = _saved_plan_results(scenario, plan)
        head = f"saved plan {args.plan}: {plan.strategy} of {plan.model} on {plan.split}"
    else:
        results, head = compare(scenario, args.strategy), scenario.describe()
    top = best(results)
    print(head)
    print(_table(results))
    m = top.metrics
    eff = "-" if m.efficiency is None else f"{m.efficiency:.1%}"
    print(f"best: {top.strategy}, {m.step_s * 1e3:.3f} ms ({m.speedup:.3f}x over sequential, "
          f"eta {eff})")
    out = Path(args.out)
    files = {"trace": str(write_trace(top.timeline, out / f"{top.strategy}.trace.json"))}
    if not args.no_plot:
        try:
            files["gantt"] = str(_draw(top.timeline, out / f"{top.strategy}.png"))
        except MissingDependencyError as exc:
            print(f"note: no Gantt picture: {exc}")
    shown = [f"{files['gantt']} (Gantt, steady-state layers)"] if "gantt" in files else []
    shown.append(f"{files['trace']} (open in https://ui.perfetto.dev)")
    print(f"wrote {' and '.join(shown)}")
    _write_json(args, {"scenario": scenario.to_dict(), "results": _results_json(results),
                       "best": top.strategy, "files": files})
    return 0


MAX_PLAN_BYTES = 256 << 20
"""Saved plans larger than this are refused (a 61-layer DeepSeek plan is about 100 KB)."""


def _load_plan(path: str):
    """The validated plan saved at ``path`` (``overlap plan --format json`` or ``--json``)."""
    from overlap.plan import Plan, validate

    try:
        size = Path(path).stat().st_size
        if size > MAX_PLAN_BYTES:
            raise OverlapError(f"plan file {path!r} is {size >> 20} MB; the limit is "
                               f"{MAX_PLAN_BYTES >> 20} MB")
        text = Path(path).read_bytes()
    except OSError as exc:
        raise OverlapError(f"cannot read plan file {path!r}: {exc.strerror or exc}") from None
    try:
        return validate(Plan.from_json(text))
    except OverlapError as exc:
        raise type(exc)(f"plan file {path!r}: {exc}") from None


def _saved_plan_results(scenario, plan) -> list:
    """A saved plan and the sequential plan of its model and split, simulated on the scenario's
    hardware and collective settings."""
    from overlap.backends.simulated import simulate
    from overlap.plan import build_plan
    from overlap.report.metrics import metrics
    from overlap.search.scenario import BASELINE, Result

    def run(p):
        return simulate(p, scenario.hardware, comm_mode=scenario.mode,
                        comm_compute_share=scenario.comm_share)

    base_plan = build_plan(BASELINE, plan.model, plan.split)
    baseline = run(base_plan)
    results = [Result(BASELINE, base_plan, baseline, metrics(baseline, baseline))]
    if plan.strategy != BASELINE or plan.steps != base_plan.steps:
        timeline = run(plan)
        results.append(Result(plan.strategy, plan, timeline, metrics(timeline, baseline)))
    return results


def _draw(timeline, path: Path) -> Path:
    from overlap.report.gantt import gantt

    return gantt(timeline, path)


def _cmd_compare(args: argparse.Namespace) -> int:
    import itertools

    from overlap.report.tables import format_table, ms, pct, times
    from overlap.search.scenario import compare

    axes = {k: getattr(args, k) for k in ("tokens", "requests", "context", "tp", "ep", "dp")}
    varied = {k: v if isinstance(v, list) else [v] for k, v in axes.items()}
    shown = [k for k, v in varied.items() if isinstance(axes[k], list) and v != [None]]
    rows, data = [], []
    for values in itertools.product(*varied.values()):
        point = dict(zip(varied, values))
        scenario = _scenario(args, **point)
        for r in compare(scenario, args.strategy):
            m = r.metrics
            cells = [point[k] for k in shown] + [r.strategy]
            if m is None:
                rows.append([*cells, "-", "-", "-", "-"])
            else:
                rows.append([*cells, ms(m.step_s), times(m.speedup), pct(m.efficiency),
                             ms(m.exposed_comm_s)])
            data.append({**point, **(_results_json([r])[0])})
    print(format_table([*shown, "strategy", "step ms", "speed-up", "eta", "exposed comm ms"], rows))
    _write_json(args, {"results": data})
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from overlap.search.scenario import plan_for

    plan = plan_for(_scenario(args), _one_strategy(args))
    print(plan.to_json() if args.format == "json" else plan)
    _write_json(args, plan.to_dict())
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from overlap.report.metrics import metrics
    from overlap.report.trace import write_trace
    from overlap.search.scenario import run

    plan = _load_plan(args.plan) if args.plan else None
    name = plan.strategy if plan else _one_strategy(args)
    target = args.output or Path(DEFAULT_OUT) / f"{name}.trace.json"
    _distinct_outputs(args, target, "-o")
    scenario = _scenario(args)
    timeline = _saved_plan_results(scenario, plan)[-1].timeline if plan else run(scenario, name)
    path = write_trace(timeline, target)
    m = metrics(timeline)
    print(f"{name}: step {m.step_s * 1e3:.3f} ms, exposed comm {m.exposed_comm_s * 1e3:.3f} ms; "
          f"wrote {path} (open it in https://ui.perfetto.dev)")
    _write_json(args, {"strategy": name, "metrics": m.to_dict(), "trace": str(path)})
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from overlap.backends.simulated import step_work
    from overlap.cost import fit, get_hardware, load_measurements
    from overlap.search.scenario import plan_for

    _distinct_outputs(args, args.measurements, "measurements")
    scenario = _scenario(args)
    plan = plan_for(scenario, _one_strategy(args))
    hw = get_hardware(scenario.hardware)
    predicted: dict[str, tuple[str, float]] = {}
    for step, work in zip(plan.steps, step_work(plan, hw, scenario.mode)):
        predicted.setdefault(step.op, (work.kind, work.seconds))  # first microbatch's shape
    measured = load_measurements(args.measurements, table=args.kernel_table, layers=args.layers,
                                 groups=_attention_groups(predicted))
    cal = fit(predicted, measured, method=args.method)
    print(cal.report())
    if not str(args.measurements).lower().endswith((".csv", ".csv.gz")):
        from overlap.cost.traces import describe, kernel_profile

        prof = kernel_profile(args.measurements, table=args.kernel_table, layers=args.layers)
        if prof is not None:  # say what the trace held beyond the matched ops
            print(describe(prof))
    _write_json(args, {"compute": cal.compute, "comm": cal.comm, "host": cal.host,
                       "method": cal.method, "error_before": cal.error_before,
                       "error_after": cal.error_after, "unmatched": list(cal.unmatched),
                       "rows": [{"op": r.name, "kind": r.kind, "predicted_s": r.predicted_s,
                                 "measured_s": r.measured_s, "corrected_s": r.corrected_s}
                                for r in cal.rows]})
    return 0


def _attention_groups(predicted: dict[str, Any]) -> dict[str, str]:
    """Kernel traces are mapped to MLA's fine ops; fold them into the coarse attention ops the
    calibrated graph has (``attn``, or ``attn0`` / ``attn1``)."""
    from overlap.ops_graph.templates.deepseek import STAGE0, STAGE1

    if "attn" in predicted:
        return dict.fromkeys((*STAGE0, *STAGE1), "attn")
    if "attn0" in predicted:
        return {**dict.fromkeys(STAGE0, "attn0"), **dict.fromkeys(STAGE1, "attn1")}
    return {}


def _cmd_graph(args: argparse.Namespace) -> int:
    from overlap.ops_graph import Shape
    from overlap.ops_graph.templates import ParallelConfig, build_model

    parallel = ParallelConfig(tp=args.tp, ep=args.ep, dp=args.dp, moe_comm=args.moe_comm)
    model = build_model(args.model, parallel, phase=args.phase, attention=args.attention,
                        dtype=args.dtype)
    tokens = args.tokens if args.tokens is not None else (16384 if args.phase == "prefill" else 256)
    if tokens < 1:
        raise OverlapError(f"'--tokens' must be >= 1 (got {tokens})")
    shape = Shape.prefill(tokens) if args.phase == "prefill" else Shape.decode(tokens, 4096)
    print(model)
    for graph in model.distinct():
        print()
        print(graph.render(shape))
    if args.json:
        write_json(args.json, model.to_dict(), indent=1, sort_keys=True)
    return 0


def _graph_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scenario")
    g.add_argument("--model", default="deepseek-v3",
                   help="preset or a path to a HF config.json (default: %(default)s)")
    g.add_argument("--phase", default="prefill", choices=("prefill", "decode"))
    g.add_argument("--tokens", type=int, default=None,
                   help="tokens per rank (default: 16384 prefill, 256 decode)")
    g.add_argument("--tp", type=int, default=1, help="tensor parallel size (default: 1)")
    g.add_argument("--ep", type=int, default=16, help="expert parallel size (default: 16)")
    g.add_argument("--dp", type=int, default=1, help="data parallel size (default: 1)")
    g.add_argument("--moe-comm", default="", choices=("all_to_all", "all_reduce", "all_gather"),
                   help="how MoE tokens move: all_to_all (EP), all_reduce (TP) or all_gather "
                        "(attention data-parallel, MoE TP) (default: all_to_all when --ep > 1, "
                        "else all_reduce)")
    g.add_argument("--dtype", default="bf16", choices=("bf16", "int8", "fp8"))
    g.add_argument("--attention", default="one", choices=("one", "two_stage", "fine"))
    g.add_argument("--json", metavar="PATH", help="also write the model graph as JSON to PATH")


def _plan_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", metavar="FILE",
                   help="simulate this saved plan JSON (from 'overlap plan --format json' or its "
                        "--json) against the sequential plan of its model and split, instead of "
                        "building plans; the model, batch and strategy flags are then unused, the "
                        "hardware and collective flags still apply")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="overlap",
                     description="Plan, simulate and inspect microbatch overlap for MoE inference. "
                                 "With no command: 'overlap simulate'.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, run, summary: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=description)
        p.set_defaults(run=run)
        return p

    p = add("simulate", _cmd_simulate, "simulate strategies and draw the best (the default)",
            "Simulate each strategy on the scenario; print step time, speed-up over sequential and "
            "overlap efficiency (eta); write the best one's Gantt PNG and Perfetto trace.")
    _scenario_flags(p)
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help="folder for the Gantt PNG and trace (default: ./%(default)s/)")
    p.add_argument("--no-plot", action="store_true", help="write the trace only (no matplotlib)")
    _plan_flag(p)
    p = add("compare", _cmd_compare, "a scenario matrix x strategies, as a table",
            "Simulate strategies over every combination of the comma-listed scenario values, "
            "e.g. --tokens 4096,16384 --ep 8,16.")
    _scenario_flags(p, lists=True)
    p = add("plan", _cmd_plan, "print a strategy's plan (text or JSON)",
            "Print the plan of one strategy: its streams and per-slot issue order, or its JSON.")
    _scenario_flags(p, strategy=None)
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="output format (default: %(default)s)")
    p = add("trace", _cmd_trace, "write one strategy's Perfetto trace",
            "Simulate one strategy and write its Chrome/Perfetto trace JSON (one track per stream).")
    _scenario_flags(p, strategy=None)
    p.add_argument("-o", "--output", metavar="PATH",
                   help=f"trace file (default: ./{DEFAULT_OUT}/STRATEGY.trace.json)")
    _plan_flag(p)
    p = add("calibrate", _cmd_calibrate, "fit cost corrections to measured op times",
            "Read a profiler trace (Chrome/Perfetto JSON; device kernels are mapped to ops by a "
            "kernel table) or a CSV op,duration_us[,kind]; fit one "
            "correction per op kind against the scenario's predicted op times; print the "
            "predicted-vs-measured error table.")
    p.add_argument("measurements", help="trace JSON (.json/.json.gz) or CSV file")
    p.add_argument("--method", choices=("median", "lstsq"), default="median",
                   help="how the factor is fitted (default: %(default)s)")
    p.add_argument("--kernel-table", metavar="FILE", default=None,
                   help="JSON kernel-to-op rules put in front of the shipped DeepSeek/H800 table")
    p.add_argument("--layers", type=int, default=None, metavar="N",
                   help="layers an un-annotated kernel trace (CUDA-graph replay) covers")
    _scenario_flags(p, strategy="sequential")
    p = add("graph", _cmd_graph, "print a model's layer graphs with their cost figures",
            "Print each distinct layer graph of the model, with FLOPs and bytes per op for the "
            "scenario's microbatch shape.")
    _graph_flags(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``overlap`` console script and ``python -m overlap``."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "simulate")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return args.run(args)
    except (OverlapError, ValueError) as exc:
        print(f"overlap: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: not an error
        return 0
    except OSError as exc:
        print(f"overlap: error: {exc}", file=sys.stderr)
        return 2
    except RecursionError:  # a loader missed a pathologically nested input: still one line
        print("overlap: error: input nested too deeply to process", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the shell's convention, 128 + SIGINT
        print("overlap: interrupted", file=sys.stderr)
        return 130
