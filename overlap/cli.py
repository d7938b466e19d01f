"""The ``overlap`` command line: plan and inspect microbatch overlap on CPU.

Every user error ends as one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from overlap.errors import OverlapError


def _scenario_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scenario")
    g.add_argument("--model", default="deepseek-v3",
                   help="preset (deepseek-v3, deepseek-r1, deepseek-v2, deepseek-v2-lite, "
                        "qwen3-moe-235b, qwen3-moe-30b) or a path to a HF config.json "
                        "(default: %(default)s)")
    g.add_argument("--phase", default="prefill", choices=("prefill", "decode"),
                   help="step kind (default: %(default)s)")
    g.add_argument("--tokens", type=int, default=None,
                   help="tokens per rank in the step (default: 16384 prefill, 256 decode)")
    g.add_argument("--tp", type=int, default=1, help="tensor parallel size (default: 1)")
    g.add_argument("--ep", type=int, default=16, help="expert parallel size (default: 16)")
    g.add_argument("--dp", type=int, default=1, help="data parallel size (default: 1)")
    g.add_argument("--dtype", default="bf16", choices=("bf16", "int8", "fp8"),
                   help="GEMM dtype; int8 is W8A8 (default: %(default)s)")
    g.add_argument("--attention", default="one", choices=("one", "two_stage", "fine"),
                   help="attention granularity (default: %(default)s)")
    g.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")


def _cmd_graph(args: argparse.Namespace) -> int:
    from overlap.ops_graph import Shape
    from overlap.ops_graph.templates import ParallelConfig, build_model

    parallel = ParallelConfig(tp=args.tp, ep=args.ep, dp=args.dp)
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
        with open(args.json, "w") as f:
            json.dump(model.to_dict(), f, indent=1, sort_keys=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overlap",
        description="Plan, simulate and inspect microbatch overlap for MoE inference.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    graph = sub.add_parser(
        "graph", help="print a model's layer graphs with their cost figures",
        description="Print each distinct layer graph of the model, with FLOPs and bytes per op "
                    "for the scenario's microbatch shape.")
    _scenario_flags(graph)
    graph.set_defaults(run=_cmd_graph)
    simulate = sub.add_parser(
        "simulate", help="the default command (for now: the model's layer graphs)",
        description="Until the simulator lands this prints the model's layer graphs.")
    _scenario_flags(simulate)
    simulate.set_defaults(run=_cmd_graph)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``overlap`` console script and ``python -m overlap``."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "simulate")
    args = parser.parse_args(argv)
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
