"""Plain-text tables for the terminal: the figures a person compares at a glance.

No dependency beyond the standard library, so the CLI prints the same table everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from overlap.report.metrics import Metrics

STRATEGY_HEADERS = ("strategy", "step ms", "speed-up", "eta", "exposed comm ms", "compute util",
                    "comm util", "bound ms")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; text left-aligned, numbers right-aligned."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [bool(rows) and all(_is_number(row[i]) for row in rows) for i in range(len(headers))]
    lines = []
    for r, row in enumerate(cells):
        parts = [c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
        if r == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _is_number(value: object) -> bool:
    return value is None or value == "-" or isinstance(value, (int, float)) or (
        isinstance(value, str) and value.rstrip("x%").replace(".", "", 1).lstrip("-").isdigit())


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def strategy_row(m: Metrics) -> list[str]:
    """One row of :data:`STRATEGY_HEADERS` for ``m``."""
    return [m.strategy, ms(m.step_s), times(m.speedup), pct(m.efficiency), ms(m.exposed_comm_s),
            pct(m.compute_util), pct(m.comm_util), ms(m.bound_s)]


def strategy_table(results: Sequence[Metrics]) -> str:
    """The per-strategy comparison table: step time, speed-up, eta, exposed comm, utilisation."""
    return format_table(STRATEGY_HEADERS, [strategy_row(m) for m in results])
