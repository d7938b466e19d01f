"""The Plan: which stream runs which (microbatch, op) of which layer, in which host order.

A Plan is the single source of truth for ordering: the simulator and every execution backend
walk the same ``steps``. It is a frozen value built without torch. Cross-stream dependencies
become event record/wait pairs, derived here once so every consumer agrees on them.

The order is produced per layer *slot*: slot 0 is the prologue, then one slot per layer in the
steady state, and a final epilogue slot. A step in slot ``s`` may belong to layer ``s`` or to an
earlier layer, which is how microbatch 0's combine of layer L overlaps microbatch 1's attention
of layer L+1.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import attrs

from overlap.errors import PlanError
from overlap.ops_graph.graph import ModelGraph, load_json
from overlap.ops_graph.op import OpKind
from overlap.plan.split import Split

SCHEMA = "overlap.plan/1"
STREAM_KINDS = ("compute", "comm", "mixed")


class Step(NamedTuple):
    """One issue: run ``op`` of ``layer`` for microbatch ``micro`` on stream ``stream``."""

    layer: int
    micro: int
    op: str
    stream: int

    @property
    def key(self) -> tuple[int, int, str]:
        return (self.layer, self.micro, self.op)

    def label(self) -> str:
        return f"{self.op}({self.micro})@{self.layer}"


@attrs.frozen
class Stream:
    """A device stream: ``compute`` streams run compute (and host) ops, ``comm`` collectives,
    and a ``mixed`` stream runs everything in issue order (the plain, unoverlapped forward).

    ``share`` is the fraction of compute units a compute stream may use (a per-stream core
    limit, as on Ascend); None means no limit.
    """

    name: str
    kind: str = attrs.field(validator=attrs.validators.in_(STREAM_KINDS))
    share: float | None = None

    def accepts(self, kind: OpKind) -> bool:
        return self.kind == "mixed" or (kind is OpKind.COMM) == (self.kind == "comm")


DEFAULT_STREAMS = (Stream("compute", "compute"), Stream("comm", "comm"))


class Wait(NamedTuple):
    """Step ``waiter`` (an index into ``Plan.steps``) waits for the event recorded after step
    ``on`` on another stream."""

    waiter: int
    on: int


@attrs.frozen
class Plan:
    """An executable, printable, JSON-serialisable schedule of a model step.

    strategy: the name of what built it.
    model:    the layer graphs it schedules.
    split:    its microbatches.
    streams:  the streams steps are issued to (index = ``Step.stream``).
    steps:    the host issue order of every (layer, microbatch, op).
    slots:    ``slots[s]`` is the index of the first step of slot ``s``.
    extra_waits: explicit waits beyond data dependencies (e.g. to delay a collective), as
              (waiter, on) step-index pairs.
    """

    strategy: str
    model: ModelGraph = attrs.field(eq=False, repr=False)
    split: Split = attrs.field(repr=str)
    streams: tuple[Stream, ...] = attrs.field(converter=tuple)
    steps: tuple[Step, ...] = attrs.field(converter=tuple, repr=lambda s: f"<{len(s)} steps>")
    slots: tuple[int, ...] = attrs.field(converter=tuple)
    extra_waits: tuple[Wait, ...] = attrs.field(default=(), converter=tuple)
    options: Mapping[str, Any] = attrs.field(factory=dict, eq=False)
    # Derived tables computed on first use (the plan itself never changes).
    _memo: dict[str, Any] = attrs.field(factory=dict, init=False, eq=False, repr=False)

    @property
    def n_micro(self) -> int:
        return self.split.n

    @property
    def n_layers(self) -> int:
        return len(self.model.layers)

    def index(self) -> dict[tuple[int, int, str], int]:
        """Step index of each (layer, microbatch, op)."""
        if "index" not in self._memo:
            self._memo["index"] = {s[:3]: i for i, s in enumerate(self.steps)}
        return dict(self._memo["index"])

    def dependencies(self) -> list[tuple[int, ...]]:
        """For each step, the indices of the steps whose results it reads.

        Data flow within a layer, across layers (layer L's inputs are layer L-1's outputs), and
        between microbatches when one continues a request cut by the previous one (its attention
        reads the KV cache the previous microbatch wrote in the same layer).
        """
        from overlap.plan.deps import step_dependencies

        if "deps" not in self._memo:
            self._memo["deps"] = tuple(step_dependencies(self))
        return list(self._memo["deps"])

    def waits(self) -> list[Wait]:
        """The event waits: each dependency on a step of another stream, plus extra waits."""
        if "waits" not in self._memo:
            steps = self.steps
            out = {Wait(i, d) for i, deps in enumerate(self.dependencies())
                   for d in deps if steps[d][3] != steps[i][3]}
            self._memo["waits"] = tuple(sorted(out.union(self.extra_waits)))
        return list(self._memo["waits"])

    def recorded(self) -> frozenset[int]:
        """Steps after which an event must be recorded (someone on another stream waits)."""
        return frozenset(w.on for w in self.waits())

    # -- rendering ------------------------------------------------------------------------------

    def slot_steps(self, slot: int) -> tuple[Step, ...]:
        """The steps of slot ``slot`` in host order."""
        bounds = [*self.slots, len(self.steps)]
        return self.steps[bounds[slot]:bounds[slot + 1]]

    def slot_layer(self, slot: int) -> int:
        """The layer a slot starts (its newest layer); the epilogue's is ``n_layers``."""
        return max(s.layer for s in self.slot_steps(slot)) + self._is_epilogue(slot)

    def _is_epilogue(self, slot: int) -> bool:
        return slot == len(self.slots) - 1 and len(self.slots) > self.n_layers

    def render_slot(self, slot: int) -> str:
        """One slot as stream lanes: a row per step, in host order, in its stream's column.

        A step is labelled ``op(microbatch)`` with ``L-1`` when it finishes the previous layer,
        and ``*`` when it waits for an event recorded on another stream.
        """
        base = self.slot_layer(slot)
        waiting = {w.waiter for w in self.waits()}
        start = ([*self.slots, len(self.steps)])[slot]
        width = max([len(s.name) for s in self.streams] + [16])
        lines = ["  " + "".join(s.name.ljust(width + 2) for s in self.streams).rstrip()]
        for i, s in enumerate(self.slot_steps(slot), start):
            rel = s.layer - base
            cell = f"{'*' if i in waiting else ''}{s.op}({s.micro}){'' if rel == 0 else f' L{rel:+d}'}"
            lines.append("  " + " " * ((width + 2) * s.stream) + cell)
        return "\n".join(lines)

    def shown_slots(self) -> list[tuple[int, str]]:
        """The slots ``print(plan)`` shows, each with its title: the prologue, one steady-state
        slot (the middle one), the last layer's slot and the epilogue, as far as they exist."""
        count = len(self.slots)
        epilogue = count > self.n_layers
        last = count - 2 if epilogue else count - 1
        shown: dict[int, str] = {}
        shown[0] = "prologue" if count > 1 else "only slot"
        if last > 1:
            shown[self._steady_slot(last)] = "steady state"
        if last > 0:
            shown[last] = "last layer"
        if epilogue and count > 1:
            shown[count - 1] = "epilogue"
        return [(slot, f"{title} (slot {slot}, layer L={self.slot_layer(slot)})"
                 if title != "epilogue" else f"epilogue (slot {slot})")
                for slot, title in sorted(shown.items())]

    def _steady_slot(self, last: int) -> int:
        """The middle slot among those that run the last layer's graph after itself (the
        repeating pattern), or the middle slot when none does."""
        layers = self.model.layers
        same = [slot for slot in range(1, last)
                if 0 < (lay := self.slot_layer(slot)) < len(layers)
                and layers[lay] is layers[lay - 1] is layers[-1]]
        return same[(len(same) - 1) // 2] if same else (last + 1) // 2

    def __str__(self) -> str:
        head = (f"plan {self.strategy}: {self.split}, {self.n_layers} layer"
                f"{'s' if self.n_layers != 1 else ''}, streams "
                f"{', '.join(s.name for s in self.streams)}; * waits for an event")
        parts = [head]
        for slot, title in self.shown_slots():
            parts.append(f"{title}:")
            parts.append(self.render_slot(slot))
        return "\n".join(parts)

    # -- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; the model graph is stored alongside so the plan is self-contained."""
        return {
            "schema": SCHEMA,
            "strategy": self.strategy,
            "options": dict(self.options),
            "model": self.model.to_dict(),
            "batch": [[r.query_len, r.context_len] for r in self.split.batch.requests],
            "micro": [[m.token_start, m.token_end] for m in self.split.micro],
            "split_reason": self.split.reason,
            "streams": [attrs.asdict(s) for s in self.streams],
            "steps": [list(s) for s in self.steps],
            "slots": list(self.slots),
            "extra_waits": [list(w) for w in self.extra_waits],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Inverse of :meth:`to_dict`. The result is not validated; call ``validate``."""
        from overlap.plan.batch import Batch
        from overlap.plan.split import Split, micro_batch

        if not isinstance(data, Mapping):
            raise PlanError(f"not a plan: expected a JSON object (got {type(data).__name__})")
        if data.get("schema") != SCHEMA:
            raise PlanError(f"not a plan: 'schema' must be {SCHEMA!r} (got {data.get('schema')!r})")
        try:
            rows = {k: _rows(data, k, kinds) for k, kinds in _ROWS.items()}
            batch = Batch.of(rows["batch"])
            micro = tuple(micro_batch(batch, i, a, b) for i, (a, b) in enumerate(rows["micro"]))
            strategy, reason, options = (data["strategy"], data.get("split_reason", ""),
                                         data.get("options", {}))
            streams = data["streams"]
            if not (isinstance(strategy, str) and isinstance(reason, str)
                    and isinstance(options, Mapping) and isinstance(streams, list)
                    and all(isinstance(s, Mapping) for s in streams)):
                raise PlanError("plan 'strategy' and 'split_reason' must be strings, 'options' "
                                "an object and 'streams' a list of objects")
            return cls(
                strategy=strategy,
                model=ModelGraph.from_dict(data["model"]),
                split=Split(batch, micro, reason),
                streams=[_stream(s) for s in streams],
                steps=[Step(*s) for s in rows["steps"]],
                slots=_ints(data, "slots"),
                extra_waits=[Wait(*w) for w in rows["extra_waits"]],
                options=options,
            )
        except KeyError as exc:
            raise PlanError(f"plan JSON is missing the field {exc.args[0]!r}") from None

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Inverse of :meth:`to_json`. The result is not validated; call ``validate``."""
        return cls.from_dict(load_json(text, "plan", PlanError))


# The list-of-rows fields of a plan's JSON and the type of each column.
_ROWS: dict[str, tuple[type, ...]] = {
    "batch": (int, int),
    "micro": (int, int),
    "steps": (int, int, str, int),
    "extra_waits": (int, int),
}


def _is(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _rows(data: Mapping[str, Any], field: str, kinds: tuple[type, ...]) -> list[tuple]:
    rows = data.get(field, []) if field == "extra_waits" else data[field]
    if not isinstance(rows, list) or not all(
            isinstance(r, list) and len(r) == len(kinds) and all(map(_is, r, kinds)) for r in rows):
        names = ", ".join(k.__name__ for k in kinds)
        raise PlanError(f"plan field {field!r} must be a list of [{names}] rows")
    return [tuple(r) for r in rows]


def _ints(data: Mapping[str, Any], field: str) -> tuple[int, ...]:
    values = data[field]
    if not isinstance(values, list) or not all(_is(v, int) for v in values):
        raise PlanError(f"plan field {field!r} must be a list of integers")
    return tuple(values)


def _stream(data: Mapping[str, Any]) -> Stream:
    name, kind, share = data.get("name"), data.get("kind"), data.get("share")
    share_ok = share is None or (isinstance(share, float | int) and not isinstance(share, bool)
                                 and 0 < share <= 1)
    if set(data) - {"name", "kind", "share"} or not isinstance(name, str) or (
            kind not in STREAM_KINDS) or not share_ok:
        raise PlanError(f"a plan stream must be {{name: a string, kind: one of "
                        f"{', '.join(STREAM_KINDS)}, share: null or in (0, 1]}} (got {dict(data)!r})")
    return Stream(name, kind, share)


def slots_from(groups: Iterable[Iterable[Step]]) -> tuple[tuple[Step, ...], tuple[int, ...]]:
    """Flatten per-slot step lists into (steps, slot start indices)."""
    steps: list[Step] = []
    starts: list[int] = []
    for group in groups:
        starts.append(len(steps))
        steps.extend(group)
    return tuple(steps), tuple(starts)
