"""Reports on executed plans: timelines, metrics, Perfetto traces, Gantt pictures, tables.

Every backend returns a :class:`Timeline`; everything here reads only that, so a simulated and a
measured step are reported alike. matplotlib is imported only when a picture is drawn.
Strategies compared on a deployment live in ``overlap.search.scenario``: that runs the
simulator, which itself builds on this package.
"""

from overlap.backends.timeline import Span, Timeline
from overlap.report.gantt import gantt, gantt_pair, side_by_side, steady_window
from overlap.report.metrics import Metrics, efficiency, metrics
from overlap.report.tables import format_table, strategy_table
from overlap.report.trace import chrome_trace, write_trace

__all__ = [
    "Metrics",
    "Span",
    "Timeline",
    "chrome_trace",
    "efficiency",
    "format_table",
    "gantt",
    "gantt_pair",
    "metrics",
    "side_by_side",
    "steady_window",
    "strategy_table",
    "write_trace",
]
