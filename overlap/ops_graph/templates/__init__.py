"""Graphs of whole models from a HF-style config and a parallel config.

``build_model("deepseek-v3", ParallelConfig(ep=16))`` gives the 61-layer DeepSeek-V3 graph:
3 dense layers then 58 MoE layers, each kind one shared :class:`~overlap.ops_graph.Graph`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from overlap.errors import ConfigError
from overlap.ops_graph.graph import Graph, ModelGraph
from overlap.ops_graph.templates import deepseek, qwen3_moe
from overlap.ops_graph.templates.config import PRESETS, ModelConfig, ParallelConfig, load_model

PHASES = ("prefill", "decode")
ATTENTION_GRAINS = ("one", "two_stage", "fine")
_FAMILY = {"deepseek": deepseek, "qwen3_moe": qwen3_moe}

__all__ = [
    "ATTENTION_GRAINS",
    "PHASES",
    "PRESETS",
    "ModelConfig",
    "ParallelConfig",
    "build_model",
    "layer_graph",
    "load_model",
]


def _check(phase: str, attention: str) -> None:
    if phase not in PHASES:
        raise ConfigError(f"'phase' must be one of {', '.join(PHASES)} (got {phase!r})")
    if attention not in ATTENTION_GRAINS:
        raise ConfigError(
            f"'attention' must be one of {', '.join(ATTENTION_GRAINS)} (got {attention!r})"
        )


def layer_graph(model: str | Mapping[str, Any] | ModelConfig, parallel: ParallelConfig | None = None,
                *, routed: bool = True, phase: str = "prefill", attention: str = "one",
                dtype: str = "bf16") -> Graph:
    """The graph of one decoder layer: a MoE layer, or with ``routed=False`` a dense one."""
    _check(phase, attention)
    m = load_model(model)
    par = parallel or ParallelConfig()
    par.check(m)
    return _FAMILY[m.family].layer(m, par, routed=routed, phase=phase, attention=attention,
                                   dtype=dtype)


def build_model(model: str | Mapping[str, Any] | ModelConfig, parallel: ParallelConfig | None = None,
                *, phase: str = "prefill", attention: str = "one", dtype: str = "bf16",
                num_layers: int | None = None) -> ModelGraph:
    """All decoder layers of ``model`` (``num_layers`` overrides the count, e.g. for tests)."""
    m = load_model(model)
    par = parallel or ParallelConfig()
    count = m.num_layers if num_layers is None else num_layers
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ConfigError(f"'num_layers' must be an integer >= 1 (got {count!r})")
    kw: dict[str, Any] = dict(phase=phase, attention=attention, dtype=dtype)
    moe = layer_graph(m, par, routed=True, **kw)
    dense_count = min(m.first_k_dense_replace, count)
    layers = [moe] * (count - dense_count)
    if dense_count:
        layers = [layer_graph(m, par, routed=False, **kw)] * dense_count + layers
    return ModelGraph(m.name, layers)
