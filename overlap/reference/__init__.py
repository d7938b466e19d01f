"""A reference DeepSeek-style MoE decoder block in plain torch, written as an ops graph.

It is the running example of the project and the yardstick of every backend: the block's methods
are the ops of the DeepSeek template graph (same op names, roles and values at each attention
grain), so any strategy can schedule it, and :meth:`ReferenceModel.plain_forward` runs the same
ops unsplit to give the result a plan must reproduce.

Only :mod:`overlap.reference.config` is torch-free; the model classes import torch on first
access (``from overlap.reference import ReferenceModel``), so ``import overlap`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from overlap.reference.config import TINY, ReferenceConfig

_LAZY = {
    "DeepseekDenseBlock": "overlap.reference.deepseek_block",
    "DeepseekMoEBlock": "overlap.reference.deepseek_block",
    "ReferenceModel": "overlap.reference.deepseek_block",
    "ExpertParallel": "overlap.reference.moe",
    "KVCache": "overlap.reference.context",
    "StepContext": "overlap.reference.context",
}


def __getattr__(name: str) -> Any:
    """The torch-backed classes, imported on first use."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from overlap._optional import require

    require("torch", purpose="the reference model (overlap.reference)")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = [
    "TINY",
    "DeepseekDenseBlock",
    "DeepseekMoEBlock",
    "ExpertParallel",
    "KVCache",
    "ReferenceConfig",
    "ReferenceModel",
    "StepContext",
]
