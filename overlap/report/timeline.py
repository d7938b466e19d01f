"""The Timeline a report reads; it is defined next to the backends that produce it.

Kept as an import path so ``from overlap.report.timeline import Timeline`` goes on working.
"""

from overlap.backends.timeline import SPAN_KINDS, Span, Timeline, covered, uncovered, union

__all__ = ["SPAN_KINDS", "Span", "Timeline", "covered", "uncovered", "union"]
