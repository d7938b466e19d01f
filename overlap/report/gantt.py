"""A Gantt picture of a timeline, in the style of DeepSeek's published overlap figures.

One lane per stream (compute above communication), one colour per microbatch, op names in the
boxes. Sixty-one layers squeezed into one picture show nothing, so by default the picture is a
window of a few layers of the steady state, where the overlap pattern repeats.

matplotlib is imported only here, through ``require``, and only its object-oriented API is used
(no pyplot, no global backend switch), so drawing never disturbs the caller's plotting state.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from overlap._atomic import atomic_path
from overlap._optional import require
from overlap.backends.timeline import Span, Timeline
from overlap.errors import ConfigError

MICRO_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3",
                 "#8C8C8C")


def steady_window(timeline: Timeline, layers: int = 3) -> tuple[float, float]:
    """(start, end) seconds covering ``layers`` layers from the middle of the model."""
    present = timeline.layers()
    if not present:
        raise ConfigError("cannot draw an empty timeline")
    count = min(layers, len(present))
    first = present[max(0, min(len(present) // 2, len(present) - count))]
    chosen = set(present[present.index(first):present.index(first) + count])
    spans = [s for s in timeline.spans if s.layer in chosen]
    return min(s.start for s in spans), max(s.end for s in spans)


def _lanes(timeline: Timeline) -> list[int]:
    """Stream indices top to bottom: streams running compute first, then communication (a
    side-by-side timeline keeps each stream's measured and simulated lanes together)."""
    has_compute = _compute_streams(timeline)
    names = timeline.streams
    if names and all(names[i].endswith(" (measured)") for i in range(0, len(names), 2)):
        paired = {i for i in range(len(names)) if has_compute & {i - i % 2, i - i % 2 + 1}}
        return sorted(range(len(names)), key=lambda i: (i not in paired, i))
    return sorted(range(len(timeline.streams)), key=lambda i: (i not in has_compute, i))


def gantt(timeline: Timeline, path: str | os.PathLike[str], *,
          window: tuple[float, float] | None = None, layers: int = 3, title: str | None = None,
          width_in: float = 14.0) -> Path:
    """Draw ``timeline`` as a PNG at ``path``; returns the path.

    window: (start, end) seconds to show; default: :func:`steady_window` of ``layers`` layers.
    """
    require("matplotlib", purpose="drawing the Gantt picture")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    lo, hi = window or steady_window(timeline, layers)
    if not hi > lo:
        raise ConfigError(f"the window must end after it starts (got {lo} .. {hi})")
    lanes = _lanes(timeline)
    fig = Figure(figsize=(width_in, 0.9 * len(lanes) + 1.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    scale = 1e3  # ms on the axis
    px_per_s = width_in * 0.8 * fig.dpi / (hi - lo)
    for row, stream in enumerate(lanes):
        y = len(lanes) - 1 - row
        for s in timeline.on_stream(stream):
            if s.end <= lo or s.start >= hi:
                continue
            _box(ax, s, max(s.start, lo), min(s.end, hi), y, scale, px_per_s)
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels([timeline.streams[i] for i in reversed(lanes)])
    ax.set_xlim(lo * scale, hi * scale)
    ax.set_ylim(-0.6, len(lanes) - 0.4)
    ax.set_xlabel("time (ms)")
    micros = sorted({s.micro for s in timeline.spans})
    ax.legend(handles=[Patch(color=MICRO_COLOURS[m % len(MICRO_COLOURS)], label=f"microbatch {m}")
                       for m in micros], loc="upper right", bbox_to_anchor=(1.0, 1.0 + 0.6 / len(lanes)),
              ncol=len(micros), fontsize=8, frameon=False)
    ax.set_title(title or f"{timeline.strategy} on {timeline.device}".strip(), loc="left", fontsize=10)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def side_by_side(measured: Timeline, simulated: Timeline, *, labels: tuple[str, str] = (
        "measured", "simulated")) -> Timeline:
    """One timeline with two lanes per stream, ``measured`` above ``simulated`` (the same plan,
    so stream ``i`` of one is stream ``i`` of the other): what :func:`gantt_pair` draws."""
    if len(measured.streams) != len(simulated.streams):
        raise ConfigError(f"side by side needs the same streams (got {len(measured.streams)} "
                          f"and {len(simulated.streams)})")
    streams = [f"{name} ({label})" for name in measured.streams for label in labels]
    spans = [attrs.evolve(s, stream=2 * s.stream + k)
             for k, tl in enumerate((measured, simulated)) for s in tl.spans]
    return Timeline(f"{measured.strategy}: {labels[0]} vs {labels[1]}", streams, spans,
                    device=measured.device or simulated.device, measured=True)


def gantt_pair(measured: Timeline, simulated: Timeline, path: str | os.PathLike[str], *,
               window: tuple[float, float] | None = None, layers: int = 3,
               title: str | None = None, width_in: float = 14.0) -> Path:
    """A Gantt PNG of a measured run and the simulation of the same plan: two lanes per stream
    (measured above simulated), so where the prediction drifts is visible at a glance."""
    both = side_by_side(measured, simulated)
    return gantt(both, path, window=window or steady_window(measured, layers), layers=layers,
                 title=title, width_in=width_in)


def _compute_streams(timeline: Timeline) -> set[int]:
    return {s.stream for s in timeline.spans if s.kind != "comm"}


def _box(ax, span: Span, start: float, end: float, y: float, scale: float, px_per_s: float) -> None:
    colour = MICRO_COLOURS[span.micro % len(MICRO_COLOURS)]
    ax.barh(y, (end - start) * scale, left=start * scale, height=0.7, color=colour,
            alpha=0.55 if span.kind == "comm" else 0.9, edgecolor="white", linewidth=0.8,
            hatch="//" if span.kind == "comm" else None)
    width_px = (end - start) * px_per_s
    for text in (f"{span.op} L{span.layer}", span.op, span.op[:4]):
        if len(text) * 6.5 + 4 <= width_px:
            ax.text((start + end) / 2 * scale, y, text, ha="center", va="center", fontsize=8,
                    color="black", clip_on=True)
            break
