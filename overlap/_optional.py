"""Import optional dependencies where they are used, with a message naming the extra.

`import overlap` must stay free of torch, vllm and matplotlib: planning and simulation run on a
laptop with only attrs installed. Modules that need an optional package call :func:`require`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from overlap.errors import MissingDependencyError

_EXTRA_OF = {
    "torch": "torch",
    "torch_npu": "npu",
    "vllm": "vllm",
    "matplotlib": "plot",
}


def require(module: str, *, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        root = module.split(".", 1)[0]
        extra = _EXTRA_OF.get(root, root)
        raise MissingDependencyError(
            f"{purpose} needs the optional dependency {root!r}, which is not installed; "
            f"install it with: pip install 'microbatch-overlap[{extra}]'"
        ) from exc
