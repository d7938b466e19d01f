"""One executor for every backend: it walks a Plan's steps and issues each on its stream.

The Plan already says everything about ordering (issue order, streams, event record/wait pairs),
so the executor only turns it into backend calls. Everything that depends on the plan alone —
where each (layer, microbatch, value) lives, what each step reads and writes, when a value can be
freed, which events to record and wait for — is compiled once per Executor into flat lists, and a
run is a single loop over precomputed closures: the executor's own cost per step stays around a
microsecond, well below a kernel launch.

Backends implement the small :class:`Backend` protocol. ``inline`` runs everything on the calling
thread in issue order; ``threads`` makes each stream a worker thread (real concurrency on CPU, so a
missing wait shows up); ``torch_streams`` and ``npu`` issue to device streams. This module does not
import torch.

``Executor(plan, backend, record=True)`` also times every step and leaves the run's
:class:`~overlap.backends.timeline.Timeline` in ``executor.timeline`` — the same object the
simulator predicts, so metrics, traces and Gantt pictures work on measured runs. Backends with a
``timing_event`` method (device streams) are timed with device events recorded around each step
on its stream; the others with the host clock around each call, on the thread that runs it. With
``record=False`` (the default) the issue program is the same as without recording.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from operator import itemgetter
from typing import Any, Protocol, runtime_checkable

from overlap.backends.timeline import Span, Timeline
from overlap.errors import ConfigError, OverlapError, PlanError, suggest
from overlap.ops_graph.graph import Graph
from overlap.ops_graph.op import OpKind
from overlap.plan.plan import Plan, Stream

# Marks a value slot that holds nothing: not yet written, or already freed. Reading it means the
# plan let a step run before (or after) the step it depends on.
MISSING = type("Missing", (), {"__repr__": lambda self: "<missing>", "__slots__": ()})()


class ExecutionError(OverlapError, RuntimeError):
    """An op raised while executing a plan; names the layer, microbatch and op, and keeps the cause.

    ``str``: ``layer 3, microbatch 1, op 'experts' failed: ValueError: boom``.
    """

    def __init__(self, layer: int, micro: int, op: str, cause: BaseException) -> None:
        self.layer, self.micro, self.op, self.cause = layer, micro, op, cause
        super().__init__(f"layer {layer}, microbatch {micro}, op {op!r} failed: "
                         f"{type(cause).__name__}: {cause}")

    def __reduce__(self):  # picklable across processes (the ctor takes 4 arguments)
        return (type(self), (self.layer, self.micro, self.op, self.cause))


class BackendUnavailableError(OverlapError, RuntimeError):
    """A backend cannot run here (no accelerator, wrong device type, missing runtime)."""


@runtime_checkable
class Backend(Protocol):
    """What the executor needs from an execution backend.

    A *handle* is the backend's object for one plan stream; an *event* marks a point in a stream.
    ``submit``, ``record`` and ``wait`` only *issue*: they may return before the work runs.
    Optional extras: ``use(handle, value)`` is called when a step reads a value produced on another
    stream (device backends use it to keep the memory alive for that stream); a true
    ``implicit_waits`` attribute says the backend orders streams by data dependencies only (graph
    capture), and the executor then refuses plans that need more; a true ``immediate`` attribute
    says ``submit`` runs the work on the calling thread before it returns and ``record``/``wait``/
    ``host_wait`` do nothing (``inline``), so the executor calls the steps itself (and a caller's
    ``context`` may count on the calling thread); ``timing_event(handle)`` returns
    a timing event recorded on the stream and ``elapsed_s(a, b)`` the seconds from event ``a`` to
    ``b`` (device backends: the executor then times steps with them instead of the host clock).
    """

    name: str

    def make_stream(self, stream: Stream) -> Any:
        """A handle for a plan stream."""

    def submit(self, handle: Any, fn: Callable[[], None], label: str) -> None:
        """Issue ``fn`` on the stream; ``label`` names it (``experts(1)@3``) for traces."""

    def record(self, handle: Any) -> Any:
        """An event that fires once the work issued so far on the stream has run."""

    def wait(self, handle: Any, event: Any) -> None:
        """Make the stream's later work wait for ``event``."""

    def host_wait(self, event: Any) -> None:
        """Block the calling (host) thread until ``event`` has fired."""

    def synchronize(self) -> None:
        """Wait for everything issued; re-raise the first failure (then be ready for more work)."""

    def close(self) -> None:
        """Release threads and streams; the backend is not used afterwards."""


BACKENDS: Mapping[str, str] = {
    "inline": "overlap.backends.inline:InlineBackend",
    "threads": "overlap.backends.threads:ThreadsBackend",
    "torch_streams": "overlap.backends.torch_streams:TorchStreamsBackend",
    "npu": "overlap.backends.npu:NpuBackend",
    "recording": "overlap.backends.recording:RecordingBackend",
}


def get_backend(name: str, **options: Any) -> Backend:
    """A new backend called ``name`` built with ``options``; an unknown name lists the valid ones."""
    try:
        module, attr = BACKENDS[name].split(":")
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}{suggest(name, BACKENDS)}; "
                          f"valid: {', '.join(BACKENDS)}") from None
    return getattr(importlib.import_module(module), attr)(**options)


def _take(value: Any, start: int, end: int) -> Any:
    return value[start:end]


def _join(parts: list[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if type(first).__module__.startswith("torch"):
        import torch  # only reached with torch values, so torch is installed

        return torch.cat(parts, 0)
    if isinstance(first, (list, tuple)):
        return type(first)(x for part in parts for x in part)
    raise TypeError(f"cannot join microbatch parts of type {type(first).__name__}; pass join=")


class _Program:
    """A plan compiled for execution: slots for values and, per step, what it reads and frees.

    Values are numbered slots (a flat list per run); layer L's inputs are the same slots as
    layer L-1's outputs, so nothing is copied between layers.
    """

    def __init__(self, plan: Plan) -> None:
        layers, n_micro = plan.model.layers, plan.n_micro
        slot: dict[tuple[int, int, str], int] = {}
        count = 0
        for layer, graph in enumerate(layers):
            for m in range(n_micro):
                for k, name in enumerate(graph.inputs):
                    if layer == 0:
                        slot[(0, m, name)] = count
                        count += 1
                    else:
                        slot[(layer, m, name)] = slot[(layer - 1, m, layers[layer - 1].outputs[k])]
                for name in graph.producer:
                    slot[(layer, m, name)] = count
                    count += 1
        self.n_slots = count
        last = len(layers) - 1
        self.inputs = [[slot[(0, m, v)] for v in layers[0].inputs] for m in range(n_micro)]
        self.outputs = [[slot[(last, m, v)] for v in layers[last].outputs] for m in range(n_micro)]
        self.reads: list[tuple[int, ...]] = []
        self.writes: list[tuple[int, ...]] = []
        self.host: list[bool] = []
        producer_stream: dict[int, int] = {}  # slot -> stream of the step writing it
        readers: dict[int, list[int]] = {}
        for i, step in enumerate(plan.steps):
            op = layers[step.layer][step.op]
            reads = tuple(slot[(step.layer, step.micro, v)] for v in op.reads)
            writes = tuple(slot[(step.layer, step.micro, v)] for v in op.writes)
            self.reads.append(reads)
            self.writes.append(writes)
            self.host.append(op.kind is OpKind.HOST)
            for s in writes:
                producer_stream[s] = step.stream
            for s in dict.fromkeys(reads):
                readers.setdefault(s, []).append(i)
        self.cross = [tuple(k for k, s in enumerate(r) if producer_stream.get(s) != plan.steps[i].stream)
                      for i, r in enumerate(self.reads)]
        keep = {s for outs in self.outputs for s in outs}
        # Freeing: a slot read on one stream only is freed by its last reader in issue order (a
        # stream runs in order); one read on several streams by whichever reader reads it last,
        # found with a per-run countdown (``shared``: slot -> (countdown id, number of readers)).
        self.frees: list[list[int]] = [[] for _ in plan.steps]
        self.shared_frees: list[list[tuple[int, int]]] = [[] for _ in plan.steps]
        self.countdowns: list[int] = []
        for s, users in readers.items():
            if s in keep:
                continue
            if len({plan.steps[i].stream for i in users}) == 1:
                self.frees[users[-1]].append(s)
            else:
                for i in users:
                    self.shared_frees[i].append((s, len(self.countdowns)))
                self.countdowns.append(len(users))
        self.waits: list[list[int]] = [[] for _ in plan.steps]
        for w in plan.waits():
            self.waits[w.waiter].append(w.on)
        self.recorded = plan.recorded()
        self.names = {s: f"{v!r} (layer {lay}, microbatch {m})" for (lay, m, v), s in slot.items()}


def _check_implicit_waits(plan: Plan, backend: str) -> None:
    """Refuse a plan whose order needs waits a graph-capturing backend cannot express: explicit
    waits without a data edge, and HOST ops (a host sync cannot be captured)."""
    deps = plan.dependencies()
    explicit = [w for w in plan.extra_waits if w.on not in deps[w.waiter]]
    if explicit:
        shown = ", ".join(f"{plan.steps[w.waiter].label()} after {plan.steps[w.on].label()}"
                          for w in explicit[:3])
        raise ConfigError(f"backend {backend!r} orders streams by data dependencies only, but plan "
                          f"{plan.strategy!r} has {len(explicit)} explicit wait(s) ({shown})")
    host = [s.label() for s in plan.steps if plan.model.layers[s.layer][s.op].kind is OpKind.HOST]
    if host:
        raise ConfigError(f"backend {backend!r} captures a graph, which cannot contain the host op(s) "
                          f"{', '.join(host[:3])} of plan {plan.strategy!r}")


class Executor:
    """Runs a Plan on a backend: ``Executor(plan, "threads").run({"hidden": x, ...})``.

    An Executor runs one step at a time (it is not re-entrant). Built from a backend *name*, it
    owns the backend and closes it in :meth:`close`; a backend object passed in stays the
    caller's.

    record: time every (layer, microbatch, op) span of each run; ``timeline`` then holds the
            last run's measured :class:`Timeline` (None before the first run and when off).
    """

    def __init__(self, plan: Plan, backend: Backend | str = "inline", *, record: bool = False) -> None:
        self.plan = plan
        self._owns_backend = isinstance(backend, str)
        self.backend: Backend = get_backend(backend) if isinstance(backend, str) else backend
        if getattr(self.backend, "implicit_waits", False):
            _check_implicit_waits(plan, self.backend.name)
            if record:
                raise ConfigError(f"backend {self.backend.name!r} captures a graph: its ops cannot "
                                  "be timed one by one; profile the replayed graph instead")
        self.record = bool(record)
        self.timeline: Timeline | None = None
        timing_event = getattr(self.backend, "timing_event", None) if record else None
        self._device_clock = timing_event is not None
        self._immediate = bool(getattr(self.backend, "immediate", False)) and not self._device_clock
        n = len(plan.steps)
        self._starts: list[Any] = [None] * n if record else []
        self._ends: list[Any] = [None] * n if record else []
        self._kinds = [plan.model.layers[s.layer][s.op].kind.value for s in plan.steps]
        self._submitted = 0
        self._program = _Program(plan)
        self._input_names = frozenset(plan.model.layers[0].inputs)
        self._handles = [self.backend.make_stream(s) for s in plan.streams]
        self._env: list[Any] = [MISSING] * self._program.n_slots
        self._countdowns: list[list[None]] = [[] for _ in self._program.countdowns]
        self._events: list[Any] = [None] * len(plan.steps)
        self._bound: tuple[Sequence[Graph], Any, list[tuple], list[Any]] | None = None

    # -- running --------------------------------------------------------------------------------

    def run(self, inputs: Mapping[str, Any], *, layers: Sequence[Graph] | None = None,
            take: Callable[[Any, int, int], Any] | None = None,
            join: Callable[[list[Any]], Any] | None = None,
            context: Callable[[int], AbstractContextManager[Any]] | None = None) -> dict[str, Any]:
        """Execute the plan on ``inputs`` (layer 0's graph inputs for the whole batch, tokens first).

        layers:  bound layer graphs to run (default: ``plan.model.layers``).
        take:    ``take(value, start, end)`` slices a whole-batch value to tokens [start, end).
        join:    merges the microbatch parts of an output (default ``torch.cat`` or list concat).
        context: ``context(m)`` is entered around every op call of microbatch ``m``.
        Returns the last layer's outputs for the whole batch, by name. An op that raises surfaces
        as one :class:`ExecutionError`; the backend is drained first, so the executor can run again.
        """
        program, calls = self._issue_program(layers, context)
        self._load(inputs, take or _take)
        env, events, backend = self._env, self._events, self.backend
        wait, submit, record = backend.wait, backend.submit, backend.record
        if self._device_clock:
            submit, self._submitted = self._timed_submit, 0
            origin = [backend.timing_event(h) for h in self._handles[:1]]
        elif self.record:
            origin = [time.perf_counter()]
        try:
            if self._immediate:  # issue order is run order and events are no-ops: just call
                for call in calls:
                    call()
            else:
                for i, handle, call, label, waits, rec, host in program:
                    for on in waits:
                        wait(handle, events[on])
                    if host:
                        self._host_step(handle, call, label, submit)
                    else:
                        submit(handle, call, label)
                    if rec:
                        events[i] = record(handle)
            backend.synchronize()
            if self.record:
                self.timeline = self._measured(origin[0])
            return self._collect(join or _join)
        except BaseException:
            # Drain what was issued; the error being handled is the one to report.
            with contextlib.suppress(Exception):
                backend.synchronize()
            raise
        finally:
            env[:] = [MISSING] * len(env)
            events[:] = [None] * len(events)
            if self.record:  # in place: the timed closures hold these lists
                self._starts[:] = [None] * len(self._starts)
                self._ends[:] = [None] * len(self._ends)

    def _host_step(self, handle: Any, call: Callable[[], None], label: str,
                   submit: Callable[[Any, Callable[[], None], str], None]) -> None:
        # A HOST op blocks the host: its inputs are complete before it is called, and nothing
        # after it is issued until it has run.
        backend = self.backend
        backend.host_wait(backend.record(handle))
        submit(handle, call, label)
        backend.host_wait(backend.record(handle))

    # -- recording ------------------------------------------------------------------------------

    def _timed_submit(self, handle: Any, call: Callable[[], None], label: str) -> None:
        # Device clock: events on the step's own stream bracket the kernels ``call`` queues.
        # Steps are submitted in step order, so the index is the count so far.
        backend = self.backend
        i = self._submitted
        self._starts[i] = backend.timing_event(handle)
        backend.submit(handle, call, label)
        self._ends[i] = backend.timing_event(handle)
        self._submitted = i + 1

    def _measured(self, origin: Any) -> Timeline:
        plan, starts, ends = self.plan, self._starts, self._ends
        if self._device_clock:
            elapsed = self.backend.elapsed_s
            starts = [elapsed(origin, e) for e in starts]
            ends = [elapsed(origin, e) for e in ends]
            device = str(getattr(self.backend, "device", self.backend.name))
        else:
            starts = [t - origin for t in starts]
            ends = [t - origin for t in ends]
            device = f"{self.backend.name} (host clock)"
        shift = min(0.0, min(starts, default=0.0))  # a stream's origin may precede stream 0's
        kinds = self._kinds
        spans = [Span(s.layer, s.micro, s.op, s.stream, starts[i] - shift, ends[i] - shift, kinds[i])
                 for i, s in enumerate(plan.steps)]
        return Timeline(plan.strategy, [s.name for s in plan.streams], spans, device=device,
                        measured=True)

    def _load(self, inputs: Mapping[str, Any], take: Callable[[Any, int, int], Any]) -> None:
        names = self.plan.model.layers[0].inputs
        if inputs.keys() != self._input_names:
            missing = [n for n in names if n not in inputs]
            unknown = [n for n in inputs if n not in names]
            raise ConfigError(f"executor inputs must be exactly layer 0's graph inputs "
                              f"({', '.join(names)}); missing: {missing}, unknown: {unknown}")
        env = self._env
        for m, micro in enumerate(self.plan.split.micro):
            a, b = micro.token_start, micro.token_end
            for name, s in zip(names, self._program.inputs[m]):
                env[s] = take(inputs[name], a, b)
        for k, n in enumerate(self._program.countdowns):
            self._countdowns[k] = [None] * n

    def _collect(self, join: Callable[[list[Any]], Any]) -> dict[str, Any]:
        env = self._env
        names = self.plan.model.layers[-1].outputs
        return {name: join([env[outs[k]] for outs in self._program.outputs])
                for k, name in enumerate(names)}

    # -- compiling closures -----------------------------------------------------------------------

    def _issue_program(self, layers: Sequence[Graph] | None,
                       context: Callable[[int], AbstractContextManager[Any]] | None
                       ) -> tuple[list[tuple], list[Callable[[], None]]]:
        """Per step (index, stream handle, call, label, waits, recorded, host), and the calls
        alone, compiled once for ``layers`` and ``context`` (reused while both are the same)."""
        layers = self.plan.model.layers if layers is None else layers
        bound = self._bound
        if bound is not None and bound[1] is context and (
                bound[0] is layers or (len(bound[0]) == len(layers)
                                       and all(a is b for a, b in zip(bound[0], layers)))):
            return bound[2], bound[3]
        fns = self._functions(layers)
        program = self._program
        use = getattr(self.backend, "use", None)
        host_clock = self.record and not self._device_clock
        out = []
        for i, step in enumerate(self.plan.steps):
            handle = self._handles[step.stream]
            call = self._closure(i, fns[i], context, use, handle)
            if host_clock:
                call = self._host_timed(i, call)
            out.append((i, handle, call, step.label(), tuple(program.waits[i]),
                        i in program.recorded, program.host[i]))
        calls = [step[2] for step in out]
        self._bound = (tuple(layers), context, out, calls)
        return out, calls

    def _functions(self, layers: Sequence[Graph]) -> list[Callable[..., Any]]:
        plan = self.plan
        if len(layers) != plan.n_layers:
            raise ConfigError(f"'layers' must hold {plan.n_layers} graphs, one per layer of the "
                              f"plan (got {len(layers)})")
        for k, (graph, planned) in enumerate(zip(layers, plan.model.layers)):
            if graph is not planned and graph.order != planned.order:
                raise ConfigError(f"layer {k}: graph {graph.name!r} does not have the ops of the "
                                  f"planned graph {planned.name!r}")
        unbound = sorted({(s.layer, s.op) for s in plan.steps if layers[s.layer][s.op].fn is None})
        if unbound:
            shown = ", ".join(f"{op!r} (layer {lay})" for lay, op in unbound[:6])
            more = f" and {len(unbound) - 6} more" if len(unbound) > 6 else ""
            raise ConfigError(f"cannot execute plan {plan.strategy!r}: op(s) {shown}{more} have no "
                              "callable; bind them with Graph.bind({name: fn}) first")
        return [layers[s.layer][s.op].fn for s in plan.steps]

    def _closure(self, i: int, fn: Callable[..., Any], context: Any, use: Any,
                 handle: Any) -> Callable[[], None]:
        # Runs once per op and step, so it is kept lean: everything that depends on the plan is
        # bound here, and the loops below are over tuples that are usually empty.
        p = self._program
        step = self.plan.steps[i]
        layer, micro, name = step.layer, step.micro, step.op
        env, countdowns = self._env, self._countdowns
        reads, writes, frees = p.reads[i], p.writes[i], tuple(p.frees[i])
        shared = tuple(p.shared_frees[i])
        cross = p.cross[i] if use is not None else ()
        single = len(writes) == 1
        out0 = writes[0] if writes else -1
        # One C call reads the arguments: a tuple of them, or the value itself when one.
        get = itemgetter(*reads) if reads else (lambda env: ())
        many = len(reads) != 1

        def fail(args: tuple[Any, ...]) -> ExecutionError:
            slot = reads[next(k for k, a in enumerate(args) if a is MISSING)]
            return ExecutionError(layer, micro, name, PlanError(
                f"value {p.names[slot]} was read before it was written or after it was freed: "
                "the plan is missing a wait"))

        def call() -> None:
            args = get(env) if many else (get(env),)
            for a in args:  # by identity: ``in`` would compare tensors by value
                if a is MISSING:
                    raise fail(args)
            for k in cross:
                use(handle, args[k])
            for s in frees:
                env[s] = MISSING
            if shared:
                for s, c in shared:
                    left = countdowns[c]
                    left.pop()
                    if not left:
                        env[s] = MISSING
            try:
                if context is None:
                    result = fn(*args)
                else:
                    with context(micro):
                        result = fn(*args)
                        # Inputs freed above are released here, inside the op's context, as a
                        # module releases what it consumed: their deallocation is the op's work.
                        a = args = None
            except Exception as exc:
                raise ExecutionError(layer, micro, name, exc) from exc
            if single:
                env[out0] = result
            elif writes:
                if len(result) != len(writes):
                    raise ExecutionError(layer, micro, name, ValueError(
                        f"returned {len(result)} values but the op writes {len(writes)}"))
                for s, v in zip(writes, result):
                    env[s] = v

        call.__qualname__ = f"step {step.label()}"
        return call

    def _host_timed(self, i: int, call: Callable[[], None]) -> Callable[[], None]:
        # Host clock, read on the thread that runs the step (a worker thread for ``threads``).
        starts, ends, clock = self._starts, self._ends, time.perf_counter

        def timed() -> None:
            starts[i] = clock()
            call()
            ends[i] = clock()

        timed.__qualname__ = call.__qualname__
        return timed

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the backend if this executor created it."""
        self._bound = None
        if self._owns_backend:
            self.backend.close()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
