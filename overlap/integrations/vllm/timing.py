"""The adapter's own host time per planned step, by section (``control(timing=True)``).

What a planned step adds over the stock forward is host work: deciding the split, cutting and
rebuilding the attention metadata, the forward contexts, the executor's dispatch of every op,
the join. :class:`HostTimer` measures exactly that: the planned forward's wall-clock and
host-thread CPU time minus the time spent inside op calls (and the embedding and final norm,
which the stock forward runs too), split into the :data:`SECTIONS` the forward passes through.

The adapter owns one and reads it only while timing: with timing off the forward reads no clock.
CPU time is per thread, so an op on a worker thread (the ``threads`` backend) is taken off the
wall figure only; on ``inline`` both figures are exact, up to the clock reads themselves (two
per op call, kept cheap by :class:`TimedScope`; see its comments).
"""

from __future__ import annotations

import threading
from time import perf_counter, thread_time

# In the order a planned step passes through them (see DeepseekOverlap.forward).
SECTIONS = ("decide", "metadata", "contexts", "dispatch", "finish")


class HostTimer:
    """Per planned step and section: wall and host-thread CPU milliseconds outside op calls."""

    __slots__ = ("wall_ms", "cpu_ms", "_host", "_wall", "_cpu", "_op_wall", "_op_cpu", "_step",
                 "_lock", "_worker_wall")

    def __init__(self) -> None:
        self.wall_ms: dict[str, list[float]] = {s: [] for s in SECTIONS}
        self.cpu_ms: dict[str, list[float]] = {s: [] for s in SECTIONS}
        self._host = threading.get_ident()
        self._wall = self._cpu = self._op_wall = self._op_cpu = 0.0
        self._step: dict[str, list[float]] = {}
        # Op time is added by the host thread (``_op_wall``, lock-free: one writer) and by
        # worker threads (``_worker_wall``, under the lock: several writers).
        self._lock = threading.Lock()
        self._worker_wall = 0.0

    def clear(self) -> None:
        """Forget every step timed so far."""
        for by in (self.wall_ms, self.cpu_ms):
            for samples in by.values():
                samples.clear()

    def start(self) -> None:
        """A step begins (on the host thread): sections are timed from here."""
        self._host = threading.get_ident()
        self._op_wall = self._op_cpu = self._worker_wall = 0.0
        self._step = {}
        self._wall, self._cpu = perf_counter(), thread_time()

    def lap(self, section: str) -> None:
        """The time since the last lap, less op time, belongs to ``section`` (adds up)."""
        wall, cpu = perf_counter(), thread_time()
        with self._lock:
            worker, self._worker_wall = self._worker_wall, 0.0
        got = self._step.setdefault(section, [0.0, 0.0])
        got[0] += wall - self._wall - self._op_wall - worker
        got[1] += cpu - self._cpu - self._op_cpu
        self._op_wall = self._op_cpu = 0.0
        self._wall, self._cpu = wall, cpu

    def done(self) -> None:
        """The step was planned to the end: keep its sections (a fallback step keeps none)."""
        for section in SECTIONS:
            wall, cpu = self._step.get(section, (0.0, 0.0))
            self.wall_ms[section].append(wall * 1e3)
            self.cpu_ms[section].append(cpu * 1e3)

    def op_clock(self) -> tuple[float, float]:
        """Stamps taken as an op call starts; hand them to :meth:`op_done` as it ends."""
        return perf_counter(), thread_time()

    def op_done(self, clock: tuple[float, float]) -> None:
        """Take the op call started at ``clock`` off the current section (any thread)."""
        wall = perf_counter() - clock[0]
        if threading.get_ident() == self._host:
            self._op_wall += wall
            self._op_cpu += thread_time() - clock[1]
        else:
            with self._lock:
                self._worker_wall += wall

    @property
    def steps(self) -> int:
        return len(self.wall_ms[SECTIONS[0]])

    def totals(self, cpu: bool = False) -> list[float]:
        """Per step, the sum of its sections (ms): the added host time."""
        by = self.cpu_ms if cpu else self.wall_ms
        return [sum(parts) for parts in zip(*(by[s] for s in SECTIONS))]


class TimedScope:
    """The adapter's reusable scope for op calls on the host thread, while timing: sets the
    thread's microbatch (``local.micro``) and takes the call's time off ``timer``'s section.

    The clocks are read in the order that keeps their own cost out of the measured host time
    as far as it can: the wall clock outermost, so the slower thread-CPU clock reads (a system
    call each) fall inside the op interval of the wall figure.
    """

    __slots__ = ("local", "micro", "timer", "wall", "cpu")

    def __init__(self, local: threading.local, micro: int, timer: HostTimer) -> None:
        self.local, self.micro, self.timer = local, micro, timer
        self.wall = self.cpu = 0.0

    def __enter__(self) -> None:
        self.local.micro = self.micro
        self.wall = perf_counter()
        self.cpu = thread_time()

    def __exit__(self, *exc: object) -> None:
        cpu = thread_time()
        wall = perf_counter()
        timer = self.timer
        timer._op_wall += wall - self.wall
        timer._op_cpu += cpu - self.cpu
