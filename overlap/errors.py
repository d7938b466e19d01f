"""The exceptions `overlap` raises.

Every error a user can cause derives from :class:`OverlapError`, so a caller (the CLI, the vLLM
plugin) can turn it into one clear line instead of a traceback. Each also derives from the
builtin it refines (``ValueError``, ``ImportError``) so generic handlers keep working.
"""

from __future__ import annotations


class OverlapError(Exception):
    """Base of every error raised on purpose by `overlap`."""


class GraphError(OverlapError, ValueError):
    """An ops graph is malformed: a cycle, a value with no producer, a value written twice, ..."""


class PlanError(OverlapError, ValueError):
    """A plan is invalid for its graph: an op missing or repeated, a dependency not honoured,
    a deadlock, or collectives ordered differently across ranks."""


class ConfigError(OverlapError, ValueError):
    """A configuration value (model, parallelism, strategy, hardware, ...) is not valid."""


class MissingDependencyError(OverlapError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""
