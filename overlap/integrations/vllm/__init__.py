"""vLLM plugin: DeepSeek V2/V3 decoder layers run under a microbatch-overlap Plan.

Installed as the ``vllm.general_plugins`` entry point ``overlap``; vLLM calls :func:`register` in
every process. Off unless an engine is configured with
``additional_config={"overlap": {...}}`` (``--additional-config``) or ``$OVERLAP_VLLM``; see
docs/vllm.md. Importing this package imports neither torch nor vLLM.
"""

from __future__ import annotations

from typing import Any

from overlap.integrations.vllm.config import KEYS, OverlapConfig, default_backend, load, parse


def register() -> None:
    """The entry point: wrap the vLLM methods the plugin needs (safe to call repeatedly)."""
    from overlap._optional import require

    require("vllm", purpose="the overlap vLLM plugin")
    from overlap.integrations.vllm.plugin import install

    install()


def stats(worker: Any) -> dict[str, Any]:
    """The adapter's counters in one worker, e.g. ``llm.collective_rpc(stats)``.

    Keys: ``steps_planned``, ``steps_<n>_microbatches``, ``op_<op>_mb<m>`` (op calls per
    microbatch), ``fallback_<why>``, ``executors_built``; plus ``strategy``, ``backend``,
    ``layers``, ``moe_forms`` (per decoder layer ``dense``, ``split`` or ``coarse``: see
    docs/vllm.md), ``unsupported`` (why nothing is planned, "" if it is), ``replaced`` (wrapped vLLM
    methods something replaced since), ``host_ms`` / ``host_cpu_ms`` (per planned step while
    timing: the adapter's own host time, i.e. the forward minus its op calls, embedding and final
    norm, in wall-clock and in the host thread's CPU time; with ``threads`` op calls on workers
    overlap, so these are exact on ``inline`` only) and ``host_sections`` /
    ``host_cpu_sections`` (the same per section of the step, ``timing.SECTIONS``: section ->
    per-step ms; ``host_ms`` is their sum).
    Empty when the plugin is off in that worker.
    """
    adapter = _adapter(worker)
    if adapter is None:
        return {}
    out: dict[str, Any] = dict(adapter.stats)
    from overlap.integrations.vllm.plugin import replaced_wrappers

    out.update(strategy=adapter.config.strategy, backend=adapter.backend_name,
               layers=adapter.layer_count, moe_forms=list(adapter.moe_forms),
               unsupported=adapter.unsupported,
               replaced=replaced_wrappers(), host_ms=adapter.host.totals(),
               host_cpu_ms=adapter.host.totals(cpu=True),
               host_sections={k: list(v) for k, v in adapter.host.wall_ms.items()},
               host_cpu_sections={k: list(v) for k, v in adapter.host.cpu_ms.items()})
    return out


def control(worker: Any, enabled: bool | None = None, backend: str | None = None,
            reset: bool = False, timing: bool | None = None, record: bool | None = None) -> bool:
    """Switch a configured plugin at run time in one worker: ``llm.collective_rpc(control,
    kwargs={"enabled": False})`` runs the stock forward until re-enabled; ``backend`` changes the
    executor backend; ``reset`` zeroes the counters; ``timing`` records each planned step's host
    time (``stats``'s ``host_ms``); ``record`` times every op span of each planned step and adds
    ``recorded_steps``, ``step_s``, ``comm_s`` and ``comm_overlapped_s`` (collective time that ran
    concurrently with compute) to ``stats``. Returns whether the worker has an adapter.

    Lets one engine compare plugin on and off (tests, benchmarks) without a second start-up.
    """
    adapter = _adapter(worker)
    if adapter is None:
        return False
    if enabled is not None:
        adapter.enabled = bool(enabled)
    if backend is not None:
        from overlap.errors import ConfigError
        from overlap.integrations.vllm.config import BACKEND_CHOICES

        if backend not in BACKEND_CHOICES[1:]:
            raise ConfigError(f"'backend' must be one of {', '.join(BACKEND_CHOICES[1:])} "
                              f"(got {backend!r})")
        adapter.set_backend(backend)
    if reset:
        adapter.stats.clear()
        adapter.host.clear()
    if timing is not None:
        adapter.timer = adapter.host if timing else None
    if record is not None:
        adapter.record = bool(record)
    return True


def _adapter(worker: Any) -> Any:
    from overlap.integrations.vllm.plugin import ADAPTER_ATTR

    for module in worker.model_runner.get_model().modules():
        adapter = module.__dict__.get(ADAPTER_ATTR)
        if adapter is not None:
            return adapter
    return None


__all__ = ["KEYS", "OverlapConfig", "control", "default_backend", "load", "parse", "register",
           "stats"]
