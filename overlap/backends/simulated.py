"""The simulated backend: a Plan executed on a virtual clock.

Choosing a schedule needs its step time before any accelerator is touched, and the step time of
an overlapped plan is not a sum: it depends on what waits for what and on what runs at once. So
the simulator plays the plan the way a device would:

* the host issues steps in plan order, paying ``launch_overhead_s`` per step; a HOST op blocks
  it, so nothing after it is issued until it finishes;
* each stream is a FIFO: a step starts once issued, its stream is free, and every step it reads
  from (and every extra wait) has finished — what event waits give on a device;
* compute ops running at once share the compute units (processor sharing: rates are recomputed
  whenever an op starts or ends); where matrix and vector units are separate cores (Ascend) a
  matrix-bound op and a vector-bound op do not slow each other; a running collective occupies
  ``comm_compute_share`` of the units (SMs on GPUs, vector cores under HCCL's AIV mode on
  Ascend); a stream's ``share`` caps what its ops get; concurrent collectives share the links;
* compute ops are priced by the roofline (``overlap.cost.op_time``), collectives by the
  alpha-beta model (``overlap.cost.collective_time``).

Identical input gives the identical timeline: the event heap orders ties explicitly.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Mapping

import attrs

from overlap.backends.timeline import Span, Timeline
from overlap.cost import Hardware, collective_time, get_hardware, op_time
from overlap.errors import ConfigError, PlanError
from overlap.ops_graph.op import Collective, OpKind
from overlap.plan.plan import Plan

COMM_MODES = ("normal", "low_latency")
FINISH, ISSUE = 0, 1  # at equal times, finishes are handled before issues


@attrs.frozen
class Work:
    """What one step occupies: its ``pool`` of units and its ``seconds`` alone at full rate."""

    kind: str  # compute | comm | host
    pool: str  # compute (GPU SMs) | matrix | vector (Ascend) | link | host
    seconds: float
    cap: float = 1.0  # the stream's share of its pool
    # Whether a running collective holds ``comm_compute_share`` of the compute units. Hook-based
    # (low-latency) all-to-alls issue RDMA writes and free every SM until the receive hook runs.
    occupies: bool = True


def step_work(plan: Plan, hw: Hardware, comm_mode: str = "normal",
              scale: Mapping[str, float] | None = None) -> list[Work]:
    """The :class:`Work` of every step of ``plan`` on ``hw`` (uncontended durations).

    scale: per-op corrections (measured/predicted, from calibration), keyed by op name or by op
           role (the name wins); an op in neither keeps its priced time.
    """
    if comm_mode not in COMM_MODES:
        raise ConfigError(f"'comm_mode' must be one of {', '.join(COMM_MODES)} (got {comm_mode!r})")
    scale = dict(scale or {})
    for key, factor in scale.items():
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (
                math.isfinite(factor) and factor > 0):
            raise ConfigError(f"scale factor for {key!r} must be a number > 0 (got {factor!r})")
    cache: dict[tuple[int, str, int], tuple[str, str, float, bool]] = {}
    out = []
    for step in plan.steps:
        graph = plan.model.layers[step.layer]
        key = (id(graph), step.op, step.micro)
        if key not in cache:
            op = graph[step.op]
            kind, pool, seconds, occupies = _price(op, plan.split.micro[step.micro].shape, hw,
                                                   comm_mode)
            factor = scale.get(op.name, scale.get(op.role, 1.0)) if scale else 1.0
            cache[key] = (kind, pool, seconds * factor, occupies)
        kind, pool, seconds, occupies = cache[key]
        share = plan.streams[step.stream].share
        out.append(Work(kind, pool, seconds, 1.0 if share is None else share, occupies))
    return out


def _price(op, shape, hw: Hardware, comm_mode: str) -> tuple[str, str, float, bool]:
    fig = op.cost(shape)
    if op.kind is OpKind.COMM:
        mode = comm_mode if op.comm.collective is Collective.ALL_TO_ALL else "normal"
        return "comm", "link", collective_time(op.comm.collective, fig.comm_bytes, op.comm.size, hw,
                                               mode=mode, routing=op.comm.routing), mode != "low_latency"
    t = op_time(fig, hw)
    seconds = t.total_s - t.launch_s  # the launch is paid on the host when the step is issued
    if op.kind is OpKind.HOST:
        return "host", "host", seconds, False
    if not hw.separate_vector_units:
        return "compute", "compute", seconds, False
    return "compute", "matrix" if t.matrix_s > t.vector_s else "vector", seconds, False


def comm_pool(hw: Hardware) -> str:
    """The pool a running collective takes ``comm_compute_share`` of."""
    return "vector" if hw.separate_vector_units else "compute"


def lower_bound(work: list[Work], comm_pool: str, comm_share: float,
                streams: list[int] | None = None, serial: frozenset[int] = frozenset()) -> float:
    """No schedule of this work finishes sooner (see ``docs/simulator.md``): the max of

    * the total comm time;
    * per pool, its work plus ``comm_share`` of the comm time (collectives occupy that pool);
    * per stream in ``serial`` (compute streams, which run one op at a time), its ops' work at
      their stream's share cap. ``streams[i]`` is the stream of ``work[i]``.
    """
    per_pool: dict[str, float] = defaultdict(float)
    for w in work:
        per_pool[w.pool] += w.seconds
    comm = per_pool.pop("link", 0.0)
    held = sum(w.seconds for w in work if w.pool == "link" and w.occupies)  # SM-holding comm
    busy = [s + (comm_share * held if pool == comm_pool else 0.0) for pool, s in per_pool.items()]
    per_stream: dict[int, float] = defaultdict(float)
    for w, stream in zip(work, streams or ()):
        if stream in serial:
            per_stream[stream] += w.seconds / w.cap
    return max([comm, *busy, *per_stream.values()])


def _fair(caps: list[float], capacity: float) -> list[float]:
    """Max-min fair rates: equal shares of ``capacity``, none above its cap."""
    rates = [0.0] * len(caps)
    left, count = max(capacity, 0.0), len(caps)
    for i in sorted(range(len(caps)), key=lambda i: (caps[i], i)):
        rates[i] = min(caps[i], left / count)
        left -= rates[i]
        count -= 1
    return rates


@attrs.define
class _Run:
    remaining: float  # seconds of work left at full rate
    rate: float = 0.0
    version: int = 0


@attrs.define
class _Clock:
    """One simulation: the state the event loop changes."""

    plan: Plan
    work: list[Work]
    launch_s: float
    comm_pool: str
    comm_share: float
    now: float = 0.0
    heap: list[tuple[float, int, int, int]] = attrs.field(factory=list)
    runs: dict[int, _Run] = attrs.field(factory=dict)
    start: dict[int, float] = attrs.field(factory=dict)
    end: dict[int, float] = attrs.field(factory=dict)
    issued: set[int] = attrs.field(factory=set)
    pending: list[int] = attrs.field(factory=list)
    users: list[list[int]] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        deps = [set(d) for d in self.plan.dependencies()]
        for waiter, on in self.plan.extra_waits:
            deps[waiter].add(on)
        last: dict[int, int] = {}
        for i, step in enumerate(self.plan.steps):  # stream FIFO: after the stream's previous step
            if step.stream in last:
                deps[i].add(last[step.stream])
            last[step.stream] = i
        self.pending = [len(d) for d in deps]
        self.users = [[] for _ in deps]
        for i, d in enumerate(deps):
            for j in sorted(d):
                self.users[j].append(i)

    def run(self) -> None:
        """Pop, set time, handle, push — until nothing is left to happen."""
        if self.plan.steps:
            heapq.heappush(self.heap, (self.launch_s, ISSUE, 0, 0))
        while self.heap:
            time, what, step, version = heapq.heappop(self.heap)
            if what == FINISH and (step not in self.runs or self.runs[step].version != version):
                continue  # its rate changed since this was pushed
            for r in self.runs.values():
                r.remaining -= r.rate * (time - self.now)
            self.now = time
            (self.finish if what == FINISH else self.issue)(step)
            self.rebalance()

    def issue(self, i: int) -> None:
        self.issued.add(i)
        if self.pending[i] == 0:
            self.runs[i] = _Run(self.work[i].seconds)
            self.start[i] = self.now
        if self.work[i].kind != "host":  # a host op blocks issue until it finishes
            self.issue_next(i)

    def issue_next(self, i: int) -> None:
        if i + 1 < len(self.work):
            heapq.heappush(self.heap, (self.now + self.launch_s, ISSUE, i + 1, 0))

    def finish(self, i: int) -> None:
        del self.runs[i]
        self.end[i] = self.now
        for u in self.users[i]:
            self.pending[u] -= 1
            if self.pending[u] == 0 and u in self.issued:
                self.runs[u] = _Run(self.work[u].seconds)
                self.start[u] = self.now
        if self.work[i].kind == "host":
            self.issue_next(i)

    def rebalance(self) -> None:
        """Recompute every running op's rate; push a new finish for each whose rate changed."""
        by_pool: dict[str, list[int]] = defaultdict(list)
        for i in sorted(self.runs):
            by_pool[self.work[i].pool].append(i)
        comms = sum(self.work[i].occupies for i in by_pool.get("link", ()))
        for pool, steps in by_pool.items():
            if pool == "host":  # the host runs host ops alone: no sharing
                rates = [1.0] * len(steps)
            else:
                capacity = 1.0 - (self.comm_share * comms if pool == self.comm_pool else 0.0)
                rates = _fair([self.work[i].cap for i in steps], capacity)
            for i, rate in zip(steps, rates):
                run = self.runs[i]
                if rate != run.rate or run.version == 0:
                    run.rate, run.version = rate, run.version + 1
                    if rate > 0:
                        when = self.now + max(run.remaining, 0.0) / rate
                        heapq.heappush(self.heap, (when, FINISH, i, run.version))


def simulate(plan: Plan, hardware: Hardware | str, *, comm_mode: str = "normal",
             comm_compute_share: float | None = None,
             scale: Mapping[str, float] | None = None) -> Timeline:
    """Predict the timeline of ``plan`` on ``hardware`` (a :class:`Hardware` or preset name).

    comm_mode:          ``normal`` or ``low_latency`` (DeepEP-style hook-based all-to-all: no
                        compute units held in flight; other collectives stay normal).
    comm_compute_share: the fraction of compute units a running (normal) collective occupies;
                        default: the hardware's ``comm_compute_share``.
    scale:              per-op-name or per-role time corrections (``Calibration.roles``).
    """
    hw = get_hardware(hardware)
    share = hw.comm_compute_share if comm_compute_share is None else comm_compute_share
    if not (isinstance(share, (int, float)) and 0 <= share <= 1):
        raise ConfigError(f"'comm_compute_share' must be in [0, 1] (got {share!r})")
    work = step_work(plan, hw, comm_mode, scale)
    clock = _Clock(plan, work, hw.launch_overhead_s, comm_pool(hw), float(share))
    clock.run()
    stuck = [plan.steps[i].label() for i in range(len(work)) if i not in clock.end]
    if stuck:
        raise PlanError(f"plan {plan.strategy!r} deadlocks: {len(stuck)} step(s) never run, "
                        f"first: {', '.join(stuck[:4])}")
    spans = [Span(s.layer, s.micro, s.op, s.stream, clock.start[i], clock.end[i], work[i].kind)
             for i, s in enumerate(plan.steps)]
    return Timeline(plan.strategy, [s.name for s in plan.streams], spans, device=hw.name,
                    bound_s=lower_bound(work, comm_pool(hw), float(share),
                                        [s.stream for s in plan.steps],
                                        frozenset(i for i, st in enumerate(plan.streams)
                                                  if st.kind == "compute")))
