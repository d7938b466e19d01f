"""The reference model's configuration, read from the same HF-style dict as the templates.

The templates keep only what the cost formulas need (:class:`~overlap.ops_graph.templates.config.
ModelConfig`); running the block also needs the routing, normalisation and rotary figures, which
this adds with DeepSeek-V3's defaults. Torch-free, so a config can be checked without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from overlap.errors import ConfigError
from overlap.ops_graph.templates.config import ModelConfig

SCORING = ("sigmoid", "softmax")

# A DeepSeek-V3-shaped model small enough for CPU tests: 64 wide, 4 heads, 8 experts (top-2 of
# 4 groups, 2 groups kept), 1 shared expert, the first layer dense.
TINY: Mapping[str, Any] = {
    "model_type": "deepseek_v3", "hidden_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 4, "intermediate_size": 96, "moe_intermediate_size": 32,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "first_k_dense_replace": 1, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4, "v_head_dim": 8, "n_group": 4, "topk_group": 2,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid",
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 512,
}


@attrs.frozen
class ReferenceConfig:
    """A DeepSeek model's architecture (``model``) plus what running it needs."""

    model: ModelConfig
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096

    def __attrs_post_init__(self) -> None:
        m = self.model
        if m.family != "deepseek":
            raise ConfigError(f"the reference model is DeepSeek-style MLA; got a {m.family} config")
        if self.scoring_func not in SCORING:
            raise ConfigError(f"'scoring_func' must be one of {', '.join(SCORING)} "
                              f"(got {self.scoring_func!r})")
        if m.n_routed_experts % self.n_group:
            raise ConfigError(f"'n_routed_experts' ({m.n_routed_experts}) must be divisible by "
                              f"'n_group' ({self.n_group})")
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"'topk_group' must be in 1..{self.n_group} (got {self.topk_group})")
        per_group = m.n_routed_experts // self.n_group
        if self.topk_group * per_group < m.num_experts_per_tok:
            raise ConfigError(f"'topk_group' ({self.topk_group}) groups of {per_group} experts "
                              f"cannot hold {m.num_experts_per_tok} experts per token")
        if m.qk_rope_head_dim % 2:
            raise ConfigError(f"'qk_rope_head_dim' must be even (got {m.qk_rope_head_dim})")

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> ReferenceConfig:
        """Read a DeepSeek V2/V3 ``config.json`` dict (missing run-time fields take V3 defaults)."""
        model = ModelConfig.from_hf(config)
        get = config.get
        return cls(
            model,
            n_group=get("n_group") or 1,
            topk_group=get("topk_group") or 1,
            routed_scaling_factor=float(get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(get("norm_topk_prob", True)),
            scoring_func=get("scoring_func", "sigmoid"),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=float(get("rope_theta", 10000.0)),
            max_position_embeddings=int(get("max_position_embeddings", 4096)),
        )

    @classmethod
    def tiny(cls, **overrides: Any) -> ReferenceConfig:
        """:data:`TINY`, with fields of the HF dict overridden."""
        return cls.from_hf({**TINY, **overrides})
