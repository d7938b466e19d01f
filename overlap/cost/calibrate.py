"""Calibration: fit the cost model to durations measured on real hardware.

Peak figures and efficiency guesses get a schedule's shape right but not its absolute times. Run
a plan once with a profiler, load the per-op durations here, and :func:`fit` computes one
multiplicative correction per op kind (compute, comm, host) from measured/predicted ratios;
:meth:`Calibration.apply` folds the compute and comm factors into a :class:`Hardware` so the
simulator predicts the measured times from then on. Accepted inputs:

* Chrome / Perfetto trace JSON: ``{"traceEvents": [...]}`` or a bare event list, with complete
  events (``ph: "X"``, ``dur`` in microseconds) or ``B``/``E`` pairs per (pid, tid). The PyTorch
  profiler's ``export_chrome_trace`` writes this format (``.json`` or ``.json.gz``).
* PyTorch-profiler traces of real kernels: device kernels mapped to ops by a kernel table
  (:mod:`overlap.cost.traces`), one measurement per (layer, op).
* CSV with a header ``op,duration_us[,kind]``.

An op that occurs many times (layers, steps) is summarised by its median duration.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
import statistics
import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from overlap.cost.hardware import Hardware
from overlap.errors import ConfigError

KINDS = ("compute", "comm", "host")
MAX_CSV_BYTES = 256 << 20
METHODS = ("median", "lstsq")


@attrs.frozen
class Measurement:
    """One measured run of an op: its name, duration in seconds, and kind when the source says."""

    name: str
    duration_s: float
    kind: str | None = None


def measurements(timeline: Any) -> list[Measurement]:
    """Every span of a :class:`~overlap.backends.timeline.Timeline` (measured with
    ``Executor(record=True)``, or simulated) as a measurement of its op, with its kind."""
    return [Measurement(s.op, s.end - s.start, s.kind) for s in timeline.spans]


def load_measurements(path: str | os.PathLike[str], *, table: Any = None, layers: int | None = None,
                      groups: Mapping[str, str] | None = None) -> list[Measurement]:
    """Every op duration in the trace or CSV at ``path``, in file order.

    A profiler trace with device kernels (``cat == "kernel"``) whose names the kernel ``table``
    (default: :data:`overlap.cost.traces.DEEPSEEK_H800`) knows is read as kernels: one
    measurement per (layer, op), the op's kernels summed (:mod:`overlap.cost.traces`);
    ``layers`` is how many layers an un-annotated trace covers; ``groups`` renames ops
    (fine op -> the coarse op of the graph being calibrated) before summing. Any other trace is
    read as complete (``X``) events or ``B``/``E`` pairs named after the ops.
    """
    if str(path).lower().endswith((".csv", ".csv.gz")):
        return _from_csv(_read_text(path), path)
    with _opened(path) as handle:
        head = handle.read(4096)
    if head[:2] == b"\x1f\x8b":
        try:
            head = gzip.GzipFile(fileobj=io.BytesIO(head)).read1(4096)
        except (OSError, EOFError, zlib.error):
            head = b"{"  # let the streamed reader report what is wrong
    stripped = head.decode("utf-8-sig", errors="replace").lstrip()
    if stripped.startswith(("{", "[")):
        from overlap.cost.traces import profile_measurements

        found = profile_measurements(path, table=table, layers=layers, groups=groups)
        return found if found is not None else _from_trace(path)
    if stripped.split("\n", 1)[0].replace(" ", "").startswith("op,duration_us"):
        return _from_csv(_read_text(path), path)
    raise ConfigError(
        f"unknown measurement format in '{path}': expected a Chrome/Perfetto trace (JSON) "
        "or a CSV with columns op,duration_us[,kind]"
    )


def _opened(path: str | os.PathLike[str]) -> Any:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise ConfigError(f"cannot read measurements from '{path}': {exc.strerror}") from exc


def _read_text(path: str | os.PathLike[str]) -> str:
    with _opened(path) as handle:
        data = handle.read(MAX_CSV_BYTES + 1)
    if data[:2] == b"\x1f\x8b":
        try:
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            data = inflate.decompress(data, MAX_CSV_BYTES + 1)
        except zlib.error as exc:
            raise ConfigError(f"'{path}' looks gzipped but cannot be decompressed") from exc
    if len(data) > MAX_CSV_BYTES:
        raise ConfigError(f"'{path}' is larger than {MAX_CSV_BYTES >> 20} MiB of CSV text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"'{path}' is not UTF-8 text (byte {exc.start})") from exc


def _from_csv(text: str, path: Any) -> list[Measurement]:
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    if "op" not in columns or "duration_us" not in columns:
        raise ConfigError(f"'{path}' CSV must have columns op,duration_us[,kind] (got: {', '.join(columns)})")
    reader.fieldnames = columns
    found = []
    for line, row in enumerate(reader, start=2):
        raw = (row.get("duration_us") or "").strip()
        try:
            duration_us = float(raw)
        except ValueError:
            raise ConfigError(f"'{path}' line {line}: 'duration_us' must be a number (got {raw!r})") from None
        if not (math.isfinite(duration_us) and duration_us >= 0):
            raise ConfigError(f"'{path}' line {line}: 'duration_us' must be >= 0 (got {raw})")
        kind = (row.get("kind") or "").strip() or None
        found.append(Measurement((row.get("op") or "").strip(), duration_us / 1e6, kind))
    return found


def _from_trace(path: Any) -> list[Measurement]:
    """Complete events and B/E pairs of a trace read as a stream (any category)."""
    from overlap.cost.trace_json import iter_events
    from overlap.cost.traces import _number

    found: list[Measurement] = []
    open_spans: dict[tuple[Any, Any], list[tuple[dict[str, Any], float]]] = defaultdict(list)
    for i, event in enumerate(iter_events(path)):
        if not isinstance(event, dict):
            continue
        phase = event.get("ph")
        if phase == "X" and "dur" in event:
            found.append(_measurement(event, _number(event, "dur", i, path)))
        elif phase in ("B", "E"):
            key = (_hashable(event.get("pid")), _hashable(event.get("tid")))
            ts = _number(event, "ts", i, path)
            if phase == "B":
                open_spans[key].append((event, ts))
            else:
                stack = open_spans.get(key)
                if stack:  # an E with no open B (a truncated trace) is dropped
                    begin, start = stack.pop()
                    found.append(_measurement(begin, ts - start))
    if not found:
        raise ConfigError(f"no complete events (ph 'X', or 'B'/'E' pairs) in '{path}'")
    return found


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, type(None))) else repr(value)


def _measurement(event: Mapping[str, Any], duration_us: float) -> Measurement:
    args = event.get("args")
    kind = args.get("kind") if isinstance(args, dict) else None
    return Measurement(
        str(event.get("name", "")),
        max(duration_us, 0.0) / 1e6,
        kind if kind in KINDS else None,
    )


@attrs.frozen
class CalibrationRow:
    """One op: predicted and measured (median) seconds, and the prediction after correction."""

    name: str
    kind: str
    predicted_s: float
    measured_s: float
    samples: int
    corrected_s: float

    @property
    def error_before(self) -> float:
        """Relative error of the uncalibrated prediction, (predicted - measured) / measured."""
        return (self.predicted_s - self.measured_s) / self.measured_s

    @property
    def error_after(self) -> float:
        """Relative error after the kind's correction factor is applied."""
        return (self.corrected_s - self.measured_s) / self.measured_s


@attrs.frozen
class Calibration:
    """Per-kind factors measured/predicted (1.0 where a kind had no matching op) and the rows."""

    compute: float
    comm: float
    host: float
    method: str
    rows: tuple[CalibrationRow, ...]
    unmatched: tuple[str, ...] = ()

    def factor(self, kind: str) -> float:
        """The correction for ``kind`` ("compute", "comm" or "host")."""
        return getattr(self, _kind(kind))

    @property
    def error_before(self) -> float:
        """Mean absolute relative error over the matched ops, before correction."""
        return statistics.fmean(abs(r.error_before) for r in self.rows)

    @property
    def error_after(self) -> float:
        """Mean absolute relative error over the matched ops, after correction."""
        return statistics.fmean(abs(r.error_after) for r in self.rows)

    def apply(self, hw: Hardware) -> Hardware:
        """``hw`` with its efficiencies divided (latencies multiplied) by the compute and comm
        factors, so its predictions scale by exactly those factors. A comm factor that would
        push a link efficiency above 1 scales ``comm_bytes_factor`` instead (same effect on
        every collective's time). Host time is not a hardware figure: the host factor is
        reported, not applied."""
        c, m = self.compute, self.comm
        changes: dict[str, float] = {
            "matrix_efficiency": hw.matrix_efficiency / c,
            "vector_efficiency": hw.vector_efficiency / c,
            "memory_efficiency": hw.memory_efficiency / c,
            "intra_link_efficiency": hw.intra_link_efficiency / m,
            "inter_link_efficiency": hw.inter_link_efficiency / m,
        }
        if max(changes["intra_link_efficiency"], changes["inter_link_efficiency"]) > 1:
            # Collectives ran faster than the links allow: the bytes model counts more than the
            # kernels move (an all-to-all priced without forwarding that deduplicates per
            # node). Correct the bytes, not the links.
            del changes["intra_link_efficiency"], changes["inter_link_efficiency"]
            changes["comm_bytes_factor"] = hw.comm_bytes_factor * m
        for field, value in changes.items():
            if field != "comm_bytes_factor" and value > 1:
                kind = "compute" if field.split("_")[0] in ("matrix", "vector", "memory") else "comm"
                raise ConfigError(
                    f"calibrated {field!r} would be {value:.3g} > 1: the {kind!r} factor "
                    f"{self.factor(kind):.3g} says ops ran faster than {hw.name!r}'s peak allows; "
                    "check the preset's peak figures or the predicted costs"
                )
        return hw.evolve(
            **changes,
            launch_overhead_s=hw.launch_overhead_s * c,
            intra_latency_s=hw.intra_latency_s * m,
            inter_latency_s=hw.inter_latency_s * m,
            low_latency_s=hw.low_latency_s * m,
            notes=f"{hw.notes} [calibrated: compute x{c:.3g}, comm x{m:.3g}]".strip(),
        )

    def report(self) -> str:
        """A text table of every matched op, predicted vs measured, before and after."""
        width = max([len("op"), *(len(r.name) for r in self.rows)])
        lines = [f"{'op':<{width}}  kind     predicted_us  measured_us  err_before  corrected_us  err_after"]
        for r in self.rows:
            lines.append(
                f"{r.name:<{width}}  {r.kind:<7}  {r.predicted_s * 1e6:12.1f}  "
                f"{r.measured_s * 1e6:11.1f}  {r.error_before:+10.1%}  "
                f"{r.corrected_s * 1e6:12.1f}  {r.error_after:+9.1%}"
            )
        lines.append(
            f"factors ({self.method}): compute x{self.compute:.3f}, comm x{self.comm:.3f}, "
            f"host x{self.host:.3f}; mean |error| {self.error_before:.1%} -> {self.error_after:.1%}"
        )
        if self.unmatched:
            lines.append(f"not measured: {', '.join(self.unmatched)}")
        return "\n".join(lines)


def _kind(kind: Any) -> str:
    name = str(getattr(kind, "value", kind)).lower()
    if name not in KINDS:
        raise ConfigError(f"unknown op kind {name!r}; valid: {', '.join(KINDS)}")
    return name


def _preview(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(set(names))
    shown = ", ".join(names[:limit])
    return f"{len(names)}: {shown}{', ...' if len(names) > limit else ''}"


def fit(
    predicted: Mapping[str, tuple[Any, float]],
    measured: Iterable[Measurement],
    *,
    method: str = "median",
) -> Calibration:
    """Per-kind corrections from ``predicted`` (op name -> (kind, seconds)) and ``measured``.

    ``method="median"`` takes the median measured/predicted ratio of each kind (robust to a few
    outliers); ``"lstsq"`` the least-squares scale ``sum(m*p) / sum(p*p)`` (weights long ops).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    durations: dict[str, list[float]] = defaultdict(list)
    for m in measured:
        durations[m.name].append(m.duration_s)
    common = [name for name in predicted if name in durations]
    if not common:
        raise ConfigError(
            f"no op names in common between predicted ({_preview(predicted)}) "
            f"and measured ({_preview(durations)})"
        )

    pairs: dict[str, list[tuple[float, float]]] = {k: [] for k in KINDS}
    matched = []
    for name in common:
        kind, seconds = predicted[name]
        kind = _kind(kind)
        measured_s = statistics.median(durations[name])
        if seconds > 0 and measured_s > 0:  # a zero on either side carries no ratio
            pairs[kind].append((float(seconds), measured_s))
            matched.append((name, kind, float(seconds), measured_s, len(durations[name])))

    factors = {kind: _scale(pairs[kind], method) for kind in KINDS}
    rows = tuple(
        CalibrationRow(name, kind, p, m, count, p * factors[kind]) for name, kind, p, m, count in matched
    )
    if not rows:
        raise ConfigError("every matched op has a zero predicted or measured time; nothing to fit")
    return Calibration(
        compute=factors["compute"],
        comm=factors["comm"],
        host=factors["host"],
        method=method,
        rows=rows,
        unmatched=tuple(sorted(set(predicted) - set(durations))),
    )


def fit_roles(predicted: Mapping[str, tuple[Any, float]], measured: Iterable[Measurement],
              roles: Mapping[str, str] | None = None) -> dict[str, float]:
    """One correction per op role: sum of measured over sum of predicted seconds of the role's
    ops (each op's median measurement), for ``simulate(..., scale=...)``.

    ``roles`` maps op name -> role (default: each op is its own role). Per role, because one
    factor per kind cannot fix a cost model that is off by 1.2x for attention and 5x for the
    norms (``benchmarks/fidelity.py``).
    """
    durations: dict[str, list[float]] = defaultdict(list)
    for m in measured:
        durations[m.name].append(m.duration_s)
    roles = roles or {}
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, (_, seconds) in predicted.items():
        if name in durations and seconds > 0:
            role = roles.get(name, name)
            sums[role][0] += statistics.median(durations[name])
            sums[role][1] += float(seconds)
    if not sums:
        raise ConfigError(f"no op names in common between predicted ({_preview(predicted)}) "
                          f"and measured ({_preview(durations)})")
    return {role: m / p for role, (m, p) in sums.items() if m > 0}


def _scale(pairs: list[tuple[float, float]], method: str) -> float:
    if not pairs:
        return 1.0
    if method == "median":
        return statistics.median(m / p for p, m in pairs)
    return sum(p * m for p, m in pairs) / sum(p * p for p, m in pairs)
