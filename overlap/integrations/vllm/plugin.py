"""What ``register()`` changes in vLLM, and nothing more: four wrapped methods.

vLLM loads ``vllm.general_plugins`` entry points in every process (front end, engine core and
each worker), so the wrappers are installed everywhere, but they do nothing unless the engine's
configuration turns the plugin on:

- ``EngineArgs.create_engine_config`` validates the configuration in the front end, so a bad
  value fails ``LLM(...)`` / ``vllm serve`` before any engine process starts;
- ``DeepseekV2Model.__init__`` attaches a :class:`DeepseekOverlap` when the plugin is on;
- ``DeepseekV2Model.forward`` hands the step to it;
- ``MLACommonMetadataBuilder.build`` keeps its inputs on the metadata it returns, so the
  adapter can build per-microbatch metadata with the same builder.

Each wrapper is marked, so registering twice changes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from typing import Any

from overlap.integrations.vllm.config import OverlapConfig, load

MARK = "__overlap_wrapper__"
ADAPTER_ATTR = "_overlap"


def install() -> None:
    """Wrap the four vLLM methods (idempotent)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.attention.mla_attention import MLACommonMetadataBuilder
    from vllm.model_executor.models.deepseek_v2 import DeepseekV2Model

    _wrap(EngineArgs, "create_engine_config", _validating)
    _wrap(DeepseekV2Model, "__init__", _attaching)
    _wrap(DeepseekV2Model, "forward", _planning)
    _wrap(MLACommonMetadataBuilder, "build", _remembering)


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
        config_of(vllm_config)  # raises ConfigError on a bad value
        return vllm_config

    return create_engine_config


def _attaching(original: Callable[..., Any]) -> Callable[..., Any]:
    def __init__(self: Any, *args: Any, vllm_config: Any, **kwargs: Any) -> None:
        original(self, *args, vllm_config=vllm_config, **kwargs)
        config = config_of(vllm_config)
        if config is not None:
            from overlap.integrations.vllm.adapter import DeepseekOverlap

            self.__dict__[ADAPTER_ATTR] = DeepseekOverlap(self, config, vllm_config)

    return __init__


def _planning(original: Callable[..., Any]) -> Callable[..., Any]:
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        adapter = self.__dict__.get(ADAPTER_ATTR)
        if adapter is None:
            return original(self, *args, **kwargs)
        return adapter.forward(functools.partial(original, self), *args, **kwargs)

    return forward


def _remembering(original: Callable[..., Any]) -> Callable[..., Any]:
    from overlap.integrations.vllm.metadata import PENDING_ATTR, Pending

    def build(self: Any, common_prefix_len: int, common_attn_metadata: Any,
              fast_build: bool = False) -> Any:
        metadata = original(self, common_prefix_len, common_attn_metadata, fast_build)
        on = self.__dict__.get("_overlap_on")
        if on is None:
            on = self.__dict__["_overlap_on"] = config_of(self.vllm_config) is not None
        if on:
            pending = Pending(functools.partial(original, self), common_prefix_len,
                              common_attn_metadata, fast_build)
            # A metadata class with __slots__ refuses it; the adapter then falls back.
            with contextlib.suppress(AttributeError):
                setattr(metadata, PENDING_ATTR, pending)
        return metadata

    return build
