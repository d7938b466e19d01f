"""The vLLM adapter's MoE graphs, its EP all-to-all over real gloo processes, and span metrics.

No vLLM needed: the graphs are torch-free, and ``ep.dispatch``/``ep.combine`` are plain
torch.distributed code, checked here between two processes against a single-process sum over
all experts. This file is also the rank process when run as a script.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from overlap.backends.timeline import Span, Timeline
from overlap.errors import ConfigError
from overlap.integrations.vllm.config import parse
from overlap.integrations.vllm.graph import layer_graph
from overlap.integrations.vllm.spans import comm_overlap, trace_path
from overlap.ops_graph.op import OpKind
from overlap.plan.stages import stages
from tests.ranks import free_port, run_ranks

TIMEOUT_S = 120


def test_split_moe_graph_has_the_six_ops_in_stage_order() -> None:
    """A split MoE layer: gate, dispatch, experts, combine, shared, merge, each in its stage."""
    g = layer_graph(moe="split", tp=1)
    assert list(g.order) == ["attn", "gate", "dispatch", "experts", "combine", "shared", "merge"]
    st = stages(g)
    for op in ("gate", "dispatch", "experts", "combine", "shared", "merge"):
        assert op in st[op], st
    assert all(op.kind is OpKind.COMPUTE for op in g), "without EP dispatch/combine are local"


def test_expert_parallel_graph_makes_dispatch_and_combine_all_to_alls() -> None:
    """With ep > 1 dispatch and combine are all_to_all collectives on the ep group."""
    g = layer_graph(moe="split", tp=2, ep=2)
    for name in ("dispatch", "combine"):
        assert g[name].kind is OpKind.COMM and str(g[name].comm) == "all_to_all@ep[2]", g[name]
    assert [op.name for op in g if op.kind is OpKind.COMM] == [
        "attn_allreduce", "dispatch", "combine", "ffn_allreduce"]


def test_coarse_and_dense_graphs_keep_one_feed_forward_op() -> None:
    """``coarse`` (monolithic kernels) keeps one ``experts`` op; dense layers one ``mlp``."""
    assert list(layer_graph(moe="coarse", tp=1).order) == ["attn", "post_norm", "experts"]
    assert list(layer_graph(moe=False, tp=2).order) == [
        "attn", "attn_allreduce", "post_norm", "mlp", "ffn_allreduce"]
    assert "shared" not in layer_graph(moe="split", tp=1, shared=False)


def test_layer_graph_rejects_a_bad_form_and_ep_without_split() -> None:
    with pytest.raises(ConfigError, match=r"'moe' must be one of dense, coarse, split \(got 'fused'\)"):
        layer_graph(moe="fused", tp=1)
    with pytest.raises(ConfigError, match=r"'ep' > 1 needs the split MoE form"):
        layer_graph(moe="coarse", tp=2, ep=2)


def test_config_moe_and_trace_entries() -> None:
    """``moe`` is split (default) or coarse; ``trace`` is a file path."""
    assert parse({}).moe == "split" and parse({}).trace is None
    assert parse({"moe": "coarse", "trace": "/tmp/t.json"}).trace == "/tmp/t.json"
    with pytest.raises(ConfigError, match=r"'moe' must be one of split, coarse \(got 'all'\)"):
        parse({"moe": "all"})
    with pytest.raises(ConfigError, match=r"'trace' must be a file path \(got 3\)"):
        parse({"trace": 3})


def _span(op: str, stream: int, start: float, end: float, kind: str) -> Span:
    return Span(0, 0, op, stream, start, end, kind)


def test_comm_overlap_counts_collective_time_under_compute() -> None:
    """Collective time is split into the part some compute span covered and the rest."""
    t = Timeline("x", ["compute", "comm"], [
        _span("attn", 0, 0.0, 2.0, "compute"), _span("dispatch", 1, 1.0, 4.0, "comm"),
        _span("experts", 0, 3.5, 5.0, "compute"), _span("combine", 1, 6.0, 7.0, "comm")])
    assert comm_overlap(t) == pytest.approx((4.0, 1.5))
    assert trace_path("/t/s.json", 0, 1) == "/t/s.json"
    assert trace_path("/t/s.json", 1, 2) == "/t/s.json.rank1"


# -- the EP all-to-all between two real processes ---------------------------------------------

def _problem(tokens: int, seed: int = 0):
    """Replicated inputs: rows, top-2 routing over 6 experts, and per-expert weight matrices."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 8, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(tokens)]).to(torch.int32)
    w = torch.rand(tokens, 2, generator=g)
    mats = torch.randn(6, 8, 8, generator=g).to(torch.bfloat16)
    return x, ids, w, mats


def _expert_rows(rows, ids, weights, mats):
    """Each row through its (local) expert's matrix, weighted: what the experts op computes."""
    import torch

    out = torch.stack([r.float() @ mats[int(e)].float() for r, e in zip(rows, ids.view(-1))]) \
        if len(rows) else rows.float()
    return (out * weights.view(-1, 1)).to(rows.dtype)


def _rank_main(rank: int, world: int, port: int, out: str, tokens: int) -> None:
    import torch
    import torch.distributed as dist

    from overlap.integrations.vllm import ep

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        x, ids, w, mats = _problem(tokens)
        maps = []
        for r in range(world):  # experts 0-2 on rank 0, 3-5 on rank 1
            m = torch.full((6,), -1, dtype=torch.int32)
            m[3 * r:3 * r + 3] = torch.arange(3, dtype=torch.int32)
            maps.append(m)
        owner, local = ep.owner_table(maps)
        sent = ep.dispatch(x, w, ids, owner, local, rank=rank, size=world, group=None)
        mine = mats[3 * rank:3 * rank + 3]
        routed = ep.combine(_expert_rows(sent.rows, sent.ids, sent.weights, mine), sent,
                            group=None)
        torch.save({"routed": routed, "start": sent.start, "end": sent.end,
                    "sent": sent.send_counts, "recv": sent.recv_counts}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tokens", [13, 1])
def test_dispatch_combine_over_gloo_equal_the_sum_over_all_experts(tmp_path: Path,
                                                                   tokens: int) -> None:
    """Two ranks, each sending its share of the rows to the experts' owners and back, end with
    every token's weighted expert sum (bf16 rounding: the sum runs in float32 at the source);
    with one token one rank has no rows and still joins every collective."""
    torch = pytest.importorskip("torch")
    port, outs = free_port(), [tmp_path / f"rank{r}.pt" for r in range(2)]
    run_ranks([[__file__, r, 2, port, outs[r], tokens] for r in range(2)], TIMEOUT_S)
    x, ids, w, mats = _problem(tokens)
    full = torch.zeros(tokens, 8)
    for t in range(tokens):
        for j in range(2):
            full[t] += w[t, j] * (x[t].float() @ mats[int(ids[t, j])].float())
    got = [torch.load(o) for o in outs]
    assert [g["start"] for g in got] == [0, (tokens + 1) // 2]
    assert sum(sum(g["sent"]) for g in got) == 2 * tokens  # every (token, expert) row once
    assert got[0]["sent"][1] == got[1]["recv"][0] and got[1]["sent"][0] == got[0]["recv"][1]
    routed = torch.cat([g["routed"] for g in got]).float()
    assert routed.shape == full.shape
    assert torch.allclose(routed, full, atol=3e-2 * float(full.abs().max()), rtol=0), (
        f"max diff {(routed - full).abs().max()}")


if __name__ == "__main__":
    rank_, world_, port_, out_, tokens_ = sys.argv[1:6]
    _rank_main(int(rank_), int(world_), int(port_), out_, int(tokens_))
