"""Model and parallel configuration for the templates, read from HF-style ``config.json`` dicts.

Only the fields the cost formulas need are kept. The presets are the published configurations
of the models (their ``config.json`` on the model hub); ``ModelConfig.from_hf`` reads any other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from overlap.errors import ConfigError, suggest

FAMILIES = ("deepseek", "qwen3_moe")

# model_type in config.json -> template family
_MODEL_TYPES = {
    "deepseek_v2": "deepseek",
    "deepseek_v3": "deepseek",
    "deepseek_v32": "deepseek",
    "kimi_k2": "deepseek",
    "qwen3_moe": "qwen3_moe",
    "qwen2_moe": "qwen3_moe",
}


MAX_DIM = 1 << 20
"""The largest size or count accepted for any model or parallel figure: far above any real
model, far below what would make the cost formulas overflow or the planner run for hours."""


def _count(low: int, *, optional: bool = False):
    """A validator: an integer (not a bool, not a float) in ``low..MAX_DIM``."""

    def check(instance: object, attribute: attrs.Attribute, value: object) -> None:
        if optional and value is None:
            return
        if not isinstance(value, int) or isinstance(value, bool):
            what = "an integer" + (" or null" if optional else "")
            raise ConfigError(f"{attribute.name!r} must be {what} (got {value!r})")
        if value < low:
            raise ConfigError(f"{attribute.name!r} must be >= {low} (got {value})")
        if value > MAX_DIM:
            raise ConfigError(f"{attribute.name!r} must be <= {MAX_DIM} (got {value})")

    return check


_positive = _count(1)
_non_negative = _count(0)


@attrs.frozen
class ModelConfig:
    """The architecture figures of a MoE decoder model."""

    name: str
    family: str = attrs.field(validator=attrs.validators.in_(FAMILIES))
    hidden_size: int = attrs.field(validator=_positive)
    num_layers: int = attrs.field(validator=_positive)
    num_heads: int = attrs.field(validator=_positive)
    intermediate_size: int = attrs.field(validator=_positive)  # dense MLP
    moe_intermediate_size: int = attrs.field(validator=_positive)
    n_routed_experts: int = attrs.field(validator=_positive)
    num_experts_per_tok: int = attrs.field(validator=_positive)
    n_shared_experts: int = attrs.field(default=0, validator=_non_negative)
    first_k_dense_replace: int = attrs.field(default=0, validator=_non_negative)
    vocab_size: int = attrs.field(default=0, validator=_non_negative)
    # Group-limited routing (DeepSeek-V2/V3): a token's experts lie in topk_group of n_group
    # expert groups; with groups on separate nodes, that bounds the nodes a token is sent to.
    n_group: int = attrs.field(default=1, validator=_positive)
    topk_group: int = attrs.field(default=1, validator=_positive)
    # MLA (DeepSeek)
    q_lora_rank: int | None = attrs.field(default=None, validator=_count(1, optional=True))
    kv_lora_rank: int = attrs.field(default=0, validator=_non_negative)
    qk_nope_head_dim: int = attrs.field(default=0, validator=_non_negative)
    qk_rope_head_dim: int = attrs.field(default=0, validator=_non_negative)
    v_head_dim: int = attrs.field(default=0, validator=_non_negative)
    # GQA (Qwen)
    num_kv_heads: int = attrs.field(default=0, validator=_non_negative)
    head_dim: int = attrs.field(default=0, validator=_non_negative)

    def __attrs_post_init__(self) -> None:
        if self.first_k_dense_replace > self.num_layers:
            raise ConfigError(f"'first_k_dense_replace' ({self.first_k_dense_replace}) must be in "
                              f"0..num_hidden_layers ({self.num_layers})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                f"'num_experts_per_tok' ({self.num_experts_per_tok}) must be <= "
                f"'n_routed_experts' ({self.n_routed_experts})"
            )
        # The reference model (overlap.reference.config) words these two checks the same way.
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"'n_routed_experts' ({self.n_routed_experts}) must be divisible by "
                              f"'n_group' ({self.n_group})")
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"'topk_group' must be in 1..{self.n_group} (got {self.topk_group})")
        if self.family == "deepseek" and not (self.kv_lora_rank and self.qk_rope_head_dim):
            raise ConfigError(f"model {self.name!r}: MLA needs kv_lora_rank and qk_rope_head_dim")
        if self.family == "qwen3_moe" and not (self.num_kv_heads and self.head_dim):
            raise ConfigError(f"model {self.name!r}: GQA needs num_kv_heads and head_dim")

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], name: str | None = None) -> ModelConfig:
        """Read a HF ``config.json`` dict of a supported MoE model."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"a model config must be a JSON object (got {type(config).__name__})")
        model_type = config.get("model_type")
        family = _MODEL_TYPES.get(str(model_type))
        if family is None:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(_MODEL_TYPES))}"
            )
        get = config.get
        try:
            common = dict(
                name=name or str(get("_name_or_path") or model_type),
                family=family,
                hidden_size=config["hidden_size"],
                num_layers=config["num_hidden_layers"],
                num_heads=config["num_attention_heads"],
                intermediate_size=config["intermediate_size"],
                moe_intermediate_size=config["moe_intermediate_size"],
                num_experts_per_tok=config["num_experts_per_tok"],
                vocab_size=get("vocab_size", 0),
            )
            if family == "deepseek":
                return cls(
                    **common,
                    n_routed_experts=config["n_routed_experts"],
                    n_shared_experts=get("n_shared_experts") or 0,
                    first_k_dense_replace=get("first_k_dense_replace", 0),
                    n_group=get("n_group") or 1,
                    topk_group=get("topk_group") or 1,
                    q_lora_rank=get("q_lora_rank"),
                    kv_lora_rank=config["kv_lora_rank"],
                    qk_nope_head_dim=config["qk_nope_head_dim"],
                    qk_rope_head_dim=config["qk_rope_head_dim"],
                    v_head_dim=config["v_head_dim"],
                )
            return cls(
                **common,
                n_routed_experts=config["num_experts"],
                n_shared_experts=1 if get("shared_expert_intermediate_size") else 0,
                num_kv_heads=config["num_key_value_heads"],
                head_dim=get("head_dim") or _derived_head_dim(config),
            )
        except KeyError as exc:
            raise ConfigError(f"config of {model_type!r} lacks the field {exc.args[0]!r}") from None
        except TypeError as exc:
            raise ConfigError(f"config of {model_type!r}: {exc}") from None


def _derived_head_dim(config: Mapping[str, Any]) -> int:
    """hidden_size / num_attention_heads, HF's default head_dim (checked figures only)."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    for name, value in (("hidden_size", hidden), ("num_attention_heads", heads)):
        _positive(None, attrs.fields(ModelConfig).hidden_size if name == "hidden_size"
                  else attrs.fields(ModelConfig).num_heads, value)
    return hidden // heads


def _hf(model_type: str, **fields: Any) -> dict[str, Any]:
    return {"model_type": model_type, **fields}


# Figures from each model's published config.json.
PRESETS: Mapping[str, Mapping[str, Any]] = {
    "deepseek-v3": _hf(
        "deepseek_v3", hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
        intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256,
        num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=3, vocab_size=129280,
        n_group=8, topk_group=4, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128),
    "deepseek-v2": _hf(
        "deepseek_v2", hidden_size=5120, num_hidden_layers=60, num_attention_heads=128,
        intermediate_size=12288, moe_intermediate_size=1536, n_routed_experts=160,
        num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, vocab_size=102400,
        n_group=8, topk_group=3, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128),
    "deepseek-v2-lite": _hf(
        "deepseek_v2", hidden_size=2048, num_hidden_layers=27, num_attention_heads=16,
        intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64,
        num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, vocab_size=102400,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128),
    "qwen3-moe-235b": _hf(
        "qwen3_moe", hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
        num_key_value_heads=4, head_dim=128, intermediate_size=12288, moe_intermediate_size=1536,
        num_experts=128, num_experts_per_tok=8, vocab_size=151936),
    "qwen3-moe-30b": _hf(
        "qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
        num_experts=128, num_experts_per_tok=8, vocab_size=151936),
}
# DeepSeek-R1 shares DeepSeek-V3's architecture.
PRESETS = {**PRESETS, "deepseek-r1": PRESETS["deepseek-v3"]}


def load_model(spec: str | Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """A model from a preset name, a path to a ``config.json``, a config dict, or as given."""
    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, Mapping):
        return ModelConfig.from_hf(spec)
    key = spec.lower()
    if key in PRESETS:
        return ModelConfig.from_hf(PRESETS[key], name=key)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"model config {str(path)!r} does not exist") from None
        except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
            raise ConfigError(f"cannot read model config {str(path)!r}: {exc}") from None
        except RecursionError:
            raise ConfigError(f"cannot read model config {str(path)!r}: JSON nested too deeply") from None
        return ModelConfig.from_hf(data, name=path.parent.name or path.stem)
    raise ConfigError(
        f"unknown model {spec!r}{suggest(spec, PRESETS)}; valid: {', '.join(PRESETS)}, "
        "or a path to a config.json"
    )


MOE_COMMS = ("all_to_all", "all_reduce", "all_gather")


@attrs.frozen
class ParallelConfig:
    """How one layer is spread over ranks.

    tp:  tensor parallelism of attention (heads split, o_proj all-reduced).
    ep:  expert parallelism (routed experts spread, dispatch/combine all-to-all).
    dp:  data-parallel attention replicas (ranks that must agree on the microbatch count).
    moe_comm: how MoE tokens move: ``all_to_all`` (EP; the default when ep > 1), ``all_reduce``
          (MoE tensor-parallel over the tp group; the default otherwise) or ``all_gather``
          (attention data-parallel, MoE tensor-parallel: tokens all-gathered before the experts
          and reduce-scattered after, vllm-ascend's all-gather MoE).
    """

    tp: int = attrs.field(default=1, validator=_count(1))
    ep: int = attrs.field(default=1, validator=_count(1))
    dp: int = attrs.field(default=1, validator=_count(1))
    moe_comm: str = attrs.field(default="")

    def __attrs_post_init__(self) -> None:
        if not self.moe_comm:
            object.__setattr__(self, "moe_comm", "all_to_all" if self.ep > 1 else "all_reduce")
        if self.moe_comm not in MOE_COMMS:
            raise ConfigError(f"'moe_comm' must be one of {', '.join(MOE_COMMS)} (got {self.moe_comm!r})")
        if self.moe_comm == "all_to_all" and self.ep == 1:
            raise ConfigError("'moe_comm' all_to_all needs ep > 1 (got ep=1)")
        if self.moe_comm != "all_to_all" and self.ep > 1:
            raise ConfigError(
                f"'moe_comm' {self.moe_comm} is tensor-parallel MoE and needs ep=1 (got ep={self.ep})"
            )
        if self.moe_comm == "all_gather" and self.tp == 1:
            raise ConfigError("'moe_comm' all_gather gathers tokens over the tp group and needs "
                              "tp > 1 (got tp=1)")

    def check(self, model: ModelConfig) -> None:
        """Raise :class:`~overlap.errors.ConfigError` unless ``model`` can be spread this way:
        every EP rank holds the same whole number of routed experts."""
        experts, ep = model.n_routed_experts, self.ep
        if ep > experts:
            raise ConfigError(f"ep ({ep}) must be <= n_routed_experts ({experts}) of "
                              f"{model.name}: each EP rank holds at least one expert")
        if experts % ep:
            valid = ", ".join(str(d) for d in range(1, experts + 1) if experts % d == 0)
            raise ConfigError(f"n_routed_experts ({experts}) of {model.name} must split evenly "
                              f"over ep ({ep}); valid ep: {valid}")
