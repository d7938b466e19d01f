"""Each built-in strategy's steady-state order as a small lane diagram, generated from the code.

docs/plan.md embeds the output of ``python -m overlap.plan.diagrams`` and docs/strategies.md that
of ``python -m overlap.plan.diagrams --table`` (the strategy records); tests check that both still
match, so the documented orders and records cannot drift from the code.
"""

from __future__ import annotations

from overlap.ops_graph.graph import ModelGraph
from overlap.ops_graph.templates import ParallelConfig, layer_graph
from overlap.plan.batch import Batch
from overlap.plan.plan import Plan
from overlap.plan.split import split
from overlap.plan.strategies import STRATEGIES, build_plan

# strategy -> (title, parallel config, phase, attention grain); auto is searched, not drawn.
CASES = {
    "sequential": ("plain forward", ParallelConfig(ep=16), "prefill", "one"),
    "ascend_dbo": ("EP all-to-all form", ParallelConfig(ep=16), "prefill", "one"),
    "ascend_dbo/tp": ("TP all-reduce form", ParallelConfig(tp=4), "prefill", "one"),
    "sglang_tbo": ("prefill", ParallelConfig(ep=16), "prefill", "one"),
    "sglang_tbo/decode": ("decode", ParallelConfig(ep=16), "decode", "two_stage"),
    "vllm_dbo": ("EP all-to-all", ParallelConfig(ep=16), "prefill", "one"),
    "deepseek_prefill": ("EP all-to-all", ParallelConfig(ep=16), "prefill", "one"),
    "deepseek_decode": ("two-stage attention", ParallelConfig(ep=16), "decode", "two_stage"),
    "ascend_multistream_mla": ("fine-grained MLA, decode", ParallelConfig(ep=16), "decode", "fine"),
    "single_batch": ("one microbatch, combine in 4 chunks", ParallelConfig(ep=16), "decode", "one"),
    "chunked_experts": ("one microbatch, 4 expert rounds", ParallelConfig(ep=16), "decode", "one"),
    "off": ("overlap off: the model's own forward", ParallelConfig(ep=16), "decode", "one"),
}


def lanes(plan: Plan, slot: int) -> str:
    """One slot of ``plan`` as a line per stream: its ops in issue order, ``op(micro)``, with
    ``'`` marking a step of the previous layer."""
    base = plan.slot_layer(slot)
    width = max(len(s.name) for s in plan.streams) + 1
    rows = {i: [] for i in range(len(plan.streams))}
    for s in plan.slot_steps(slot):
        rows[s.stream].append(f"{s.op}({s.micro}){chr(39) if s.layer < base else ''}")
    return "\n".join(f"{(plan.streams[i].name + ':').ljust(width)} {' '.join(ops)}".rstrip()
                     for i, ops in rows.items())


def example_plan(case: str) -> Plan:
    """The plan drawn for ``case``: three identical MoE layers of DeepSeek-V3, two microbatches."""
    _, parallel, phase, attention = CASES[case]
    graph = layer_graph("deepseek-v3", parallel, phase=phase, attention=attention)
    model = ModelGraph("deepseek-v3", [graph] * 3)
    batch = Batch.decode(64, 4096) if phase == "decode" else Batch.prefill(8192, 4)
    return build_plan(case.split("/")[0], model, split(batch, 2))


def render(case: str) -> str:
    """The steady-state slot (layer 1 of 3) of ``case`` as lanes."""
    return lanes(example_plan(case), 1)


def render_all() -> str:
    """Every case, as the markdown docs/plan.md embeds."""
    parts = []
    for case, (title, *_) in CASES.items():
        parts.append(f"{case.split('/')[0]} ({title}):\n\n```\n{render(case)}\n```\n")
    return "\n".join(parts)


def strategy_table() -> str:
    """The strategy records as the markdown table docs/strategies.md embeds."""
    rows = ["| strategy | microbatches | attention grain | what it does | source |",
            "|---|---|---|---|---|"]
    for s in STRATEGIES.values():
        counts = ", ".join(map(str, s.microbatch_counts))
        rows.append(f"| `{s.name}` | {counts} | `{s.grain}` | {s.summary} | {s.source} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    import sys

    print(strategy_table() if sys.argv[1:] == ["--table"] else render_all(), end="")
