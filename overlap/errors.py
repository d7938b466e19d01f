"""The exceptions `overlap` raises.

Every error a user can cause derives from :class:`OverlapError`, so a caller (the CLI, the vLLM
plugin) can turn it into one clear line instead of a traceback. Each also derives from the
builtin it refines (``ValueError``, ``ImportError``) so generic handlers keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class OverlapError(Exception):
    """Base of every error raised on purpose by `overlap`."""


class GraphError(OverlapError, ValueError):
    """An ops graph is malformed: a cycle, a value with no producer, a value written twice, ..."""


class PlanError(OverlapError, ValueError):
    """A plan is invalid for its graph: an op missing or repeated, a dependency not honoured,
    a deadlock, or collectives ordered differently across ranks."""


class ConfigError(OverlapError, ValueError):
    """A configuration value (model, parallelism, strategy, hardware, ...) is not valid."""


class OutputError(OverlapError, OSError):
    """An output file could not be written; the message names the file. The previous content of
    the file, if any, is left in place."""


class MissingDependencyError(OverlapError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


def suggest(name: object, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the valid name closest to a mistyped ``name``, else ``""``.

    Meant to be appended to an "unknown X" message that also lists what is valid, e.g.
    ``f"unknown strategy {name!r}{suggest(name, names)}; valid: {', '.join(names)}"``.
    """
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name.lower(), [v.lower() for v in valid], n=1, cutoff=0.6)
    if not close:
        return ""
    original = next(v for v in valid if v.lower() == close[0])
    return f" (did you mean {original!r}?)"
