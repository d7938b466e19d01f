"""What ``register()`` changes in vLLM, and nothing more: five wrapped methods.

vLLM loads ``vllm.general_plugins`` entry points in every process (front end, engine core and
each worker), so the wrappers are installed everywhere, but they do nothing unless the engine's
configuration turns the plugin on:

- ``EngineArgs.create_engine_config`` validates the configuration in the front end, and refuses
  an engine the plugin cannot serve (``config.check_engine``: vLLM's own DBO, LoRA, speculative
  decoding, an untested vLLM, a compiled model), so either fails ``LLM(...)`` / ``vllm serve``
  before any engine process starts;
- ``DeepseekV2Model.__init__`` attaches a :class:`DeepseekOverlap` when the plugin is on;
- ``DeepseekV2Model.forward`` hands the step to it;
- ``MLACommonMetadataBuilder.build`` keeps its inputs and builder on the metadata it returns,
  so the adapter can build per-microbatch metadata with that builder's most-derived ``build``;
- ``MLACommonMetadataBuilder.__new__`` records each builder's constructor arguments, so the
  adapter can make one builder like it per microbatch, and hooks the ``build`` of any subclass
  that defines its own (only the outermost of nested hooked builds remembers).

Each wrapper is marked, so registering twice changes nothing. A platform plugin that assigns
its own ``DeepseekV2Model.forward`` afterwards (vllm-ascend does, in its worker patches) removes
the planning wrapper; :func:`replaced_wrappers` detects that and the adapter logs it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from overlap.integrations.vllm.config import SECTION, EngineFacts, OverlapConfig, check_engine, load

MARK = "__overlap_wrapper__"
ADAPTER_ATTR = "_overlap"
log = logging.getLogger("vllm.overlap")


def install() -> None:
    """Wrap the five vLLM methods (idempotent)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.attention.mla_attention import MLACommonMetadataBuilder
    from vllm.model_executor.models.deepseek_v2 import DeepseekV2Model

    _wrap(EngineArgs, "create_engine_config", _validating)
    _wrap(DeepseekV2Model, "__init__", _attaching)
    _wrap(DeepseekV2Model, "forward", _planning)
    _wrap(MLACommonMetadataBuilder, "build", _remembering)
    if not getattr(MLACommonMetadataBuilder.__dict__.get("__new__"), MARK, False):
        MLACommonMetadataBuilder.__new__ = _recording_new  # type: ignore[method-assign]


def replaced_wrappers() -> list[str]:
    """The wrapped vLLM methods whose wrapper something has since replaced (``[]``: all in place)."""
    from vllm.model_executor.layers.attention.mla_attention import MLACommonMetadataBuilder
    from vllm.model_executor.models.deepseek_v2 import DeepseekV2Model

    out = []
    for cls, name in ((DeepseekV2Model, "__init__"), (DeepseekV2Model, "forward"),
                      (MLACommonMetadataBuilder, "build")):
        current = getattr(cls, name)
        if not getattr(current, MARK, False):
            out.append(f"{cls.__name__}.{name} (now {getattr(current, '__module__', '?')}."
                       f"{getattr(current, '__qualname__', current)})")
    return out


def engine_facts(engine_args: Any, vllm_config: Any) -> EngineFacts:
    """What ``config.check_engine`` needs, read from vLLM's engine arguments and config.

    vLLM's DBO flags are read from the engine arguments: the CPU platform silently switches
    ``enable_dbo`` off in the config, but the user asked for it.
    """
    import vllm
    from vllm.config import CompilationMode

    par = vllm_config.parallel_config
    return EngineFacts(
        vllm_version=vllm.__version__,
        enable_dbo=bool(getattr(engine_args, "enable_dbo", False) or par.enable_dbo),
        ubatch_size=max(int(getattr(engine_args, "ubatch_size", 0) or 0), par.ubatch_size),
        lora=vllm_config.lora_config is not None,
        speculative=vllm_config.speculative_config is not None,
        compiled=vllm_config.compilation_config.mode != CompilationMode.NONE)


def config_of(vllm_config: Any) -> OverlapConfig | None:
    """The plugin's configuration for an engine (None: off). The one place it is read."""
    return load(getattr(vllm_config, "additional_config", None), os.environ)


def _wrap(cls: type, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    original = getattr(cls, name)
    if getattr(original, MARK, False):
        return
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, MARK, True)
    setattr(cls, name, wrapper)


def _validating(original: Callable[..., Any]) -> Callable[..., Any]:
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        vllm_config = original(self, *args, **kwargs)
        config = config_of(vllm_config)  # raises ConfigError on a bad value
        if config is not None:
            reasons = check_engine(config, engine_facts(self, vllm_config))
            if reasons:  # best effort: every process of this engine sees the plugin off
                log.warning("overlap: plugin off for this engine (best_effort): %s",
                            "; ".join(reasons))
                extra = vllm_config.additional_config
                section = dict(extra.get(SECTION) or {})
                extra[SECTION] = {**section, "enabled": False}
        return vllm_config

    return create_engine_config


def _attaching(original: Callable[..., Any]) -> Callable[..., Any]:
    def __init__(self: Any, *args: Any, vllm_config: Any, **kwargs: Any) -> None:
        original(self, *args, vllm_config=vllm_config, **kwargs)
        config = config_of(vllm_config)
        if config is not None:
            from overlap.integrations.vllm.adapter import DeepseekOverlap

            adapter = DeepseekOverlap(self, config, vllm_config)
            self.__dict__[ADAPTER_ATTR] = adapter
            replaced = replaced_wrappers()
            if replaced:  # e.g. a platform plugin re-assigned the forward after install()
                adapter.unsupported = ("the plugin's wrappers were replaced after it installed "
                                       f"them: {', '.join(replaced)}")
                log.warning("overlap: %s; the plugin does not run in this process",
                            adapter.unsupported)

    return __init__


def _planning(original: Callable[..., Any]) -> Callable[..., Any]:
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        adapter = self.__dict__.get(ADAPTER_ATTR)
        if adapter is None:
            return original(self, *args, **kwargs)
        return adapter.forward(functools.partial(original, self), *args, **kwargs)

    return forward


_depth = threading.local()  # nesting of hooked builds: only the outermost remembers


def _remembering(original: Callable[..., Any]) -> Callable[..., Any]:
    from overlap.integrations.vllm.metadata import PENDING_ATTR, Pending, rebuilding

    def build(self: Any, common_prefix_len: int, common_attn_metadata: Any,
              fast_build: bool = False) -> Any:
        depth = getattr(_depth, "n", 0)
        _depth.n = depth + 1
        try:
            metadata = original(self, common_prefix_len, common_attn_metadata, fast_build)
        finally:
            _depth.n = depth
        if depth or rebuilding():  # a subclass's super().build, or the adapter's own rebuild
            return metadata
        on = self.__dict__.get("_overlap_on")
        if on is None:
            on = self.__dict__["_overlap_on"] = config_of(self.vllm_config) is not None
        if on:
            # ``self`` may be a subclass whose build wraps this one (AMX_MLA adds fields after
            # it): the adapter rebuilds with ``type(self).build``, not ``original``.
            pending = Pending(self, common_prefix_len, common_attn_metadata, fast_build)
            # A metadata class with __slots__ refuses it; the adapter then falls back.
            with contextlib.suppress(AttributeError):
                setattr(metadata, PENDING_ATTR, pending)
        return metadata

    return build


def _recording_new(cls: type, *args: Any, **kwargs: Any) -> Any:
    """``MLACommonMetadataBuilder.__new__``: keep the constructor arguments, for cloning.

    It also hooks the ``build`` of a subclass that defines its own (a platform builder that
    does not call ``super().build`` would otherwise never reach the hook).
    """
    from overlap.integrations.vllm.metadata import ARGS_ATTR

    own = cls.__dict__.get("build")
    if own is not None and not getattr(own, MARK, False):
        _wrap(cls, "build", _remembering)
    self = object.__new__(cls)
    self.__dict__[ARGS_ATTR] = (args, kwargs)
    return self


setattr(_recording_new, MARK, True)
