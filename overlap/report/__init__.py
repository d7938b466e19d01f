"""Reports on executed plans: timelines, metrics, Perfetto traces, Gantt pictures, tables."""

from overlap.report.metrics import Metrics, efficiency, metrics
from overlap.report.timeline import Span, Timeline

__all__ = ["Metrics", "Span", "Timeline", "efficiency", "metrics"]
