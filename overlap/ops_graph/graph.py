"""A layer as a graph of ops, with dependencies derived from the values they exchange.

Nobody writes edges by hand: an op depends on the op that writes each value it reads. That makes
the usual mistakes detectable when the graph is built — a value nobody writes, a value written
twice, a value computed and then ignored, a cycle — and each error names the ops involved.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from overlap._cycles import find_cycle
from overlap.errors import GraphError
from overlap.ops_graph.cost import FREE, OpCost
from overlap.ops_graph.op import Comm, Op, OpKind
from overlap.ops_graph.shape import Shape

SCHEMA = "overlap.graph/1"
MODEL_SCHEMA = "overlap.model/1"


def _names(value: Iterable[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.frozen
class Graph:
    """One layer's ops; ``inputs`` come from the previous layer, ``outputs`` go to the next.

    Ops may be listed in any order. Construction validates the graph and raises
    :class:`~overlap.errors.GraphError` naming the offending ops.
    """

    name: str
    ops: tuple[Op, ...] = attrs.field(converter=tuple)
    inputs: tuple[str, ...] = attrs.field(converter=_names)
    outputs: tuple[str, ...] = attrs.field(converter=_names)
    # Derived in __attrs_post_init__; not part of identity.
    producer: Mapping[str, str] = attrs.field(init=False, eq=False, repr=False)
    deps: Mapping[str, tuple[str, ...]] = attrs.field(init=False, eq=False, repr=False)
    order: tuple[str, ...] = attrs.field(init=False, eq=False, repr=False)
    _by_name: Mapping[str, Op] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        by_name: dict[str, Op] = {}
        for op in self.ops:
            if not isinstance(op, Op):
                raise GraphError(f"graph {self.name!r}: {op!r} is not an Op")
            if op.name in by_name:
                raise GraphError(f"graph {self.name!r}: op name {op.name!r} is used twice")
            by_name[op.name] = op
        producer = self._producers(by_name)
        deps = {
            op.name: tuple(dict.fromkeys(producer[v] for v in op.reads if v in producer))
            for op in self.ops
        }
        self._check_consumers(producer)
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "producer", producer)
        object.__setattr__(self, "deps", deps)
        object.__setattr__(self, "order", self._topological(deps))

    def _producers(self, by_name: Mapping[str, Op]) -> dict[str, str]:
        producer: dict[str, str] = {}
        inputs = set(self.inputs)
        if len(inputs) != len(self.inputs):
            raise GraphError(f"graph {self.name!r}: inputs {self.inputs} name a value twice")
        for op in by_name.values():
            for value in op.writes:
                if value in inputs:
                    raise GraphError(
                        f"graph {self.name!r}: value {value!r} is a graph input and is also "
                        f"written by op {op.name!r}"
                    )
                if value in producer:
                    raise GraphError(
                        f"graph {self.name!r}: value {value!r} is written by both "
                        f"op {producer[value]!r} and op {op.name!r}"
                    )
                producer[value] = op.name
        for op in by_name.values():
            for value in op.reads:
                if value not in producer and value not in inputs:
                    raise GraphError(
                        f"graph {self.name!r}: op {op.name!r} reads {value!r}, which no op "
                        f"writes and is not a graph input (inputs: {', '.join(self.inputs)})"
                    )
        return producer

    def _check_consumers(self, producer: Mapping[str, str]) -> None:
        read = {v for op in self.ops for v in op.reads}
        for value in self.outputs:
            if value not in producer and value not in self.inputs:
                raise GraphError(
                    f"graph {self.name!r}: output {value!r} is neither written by an op nor a "
                    "graph input"
                )
        outputs = set(self.outputs)
        for value, op_name in producer.items():
            if value not in read and value not in outputs:
                raise GraphError(
                    f"graph {self.name!r}: value {value!r} written by op {op_name!r} is never "
                    "read and is not a graph output"
                )

    def _topological(self, deps: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
        # Kahn's algorithm, taking ready ops in declaration order so the order is stable.
        waiting = {name: len(d) for name, d in deps.items()}
        users: dict[str, list[str]] = {name: [] for name in deps}
        for name, d in deps.items():
            for dep in d:
                users[dep].append(name)
        position = {op.name: i for i, op in enumerate(self.ops)}
        ready = sorted((n for n, c in waiting.items() if c == 0), key=position.__getitem__)
        order: list[str] = []
        while ready:
            name = ready.pop(0)
            order.append(name)
            for user in users[name]:
                waiting[user] -= 1
                if waiting[user] == 0:
                    ready.append(user)
                    ready.sort(key=position.__getitem__)
        if len(order) != len(deps):
            raise GraphError(f"graph {self.name!r}: cycle {' -> '.join(self._a_cycle(deps))}")
        return tuple(order)

    @staticmethod
    def _a_cycle(deps: Mapping[str, tuple[str, ...]]) -> list[str]:
        cycle = find_cycle(deps, deps.__getitem__)  # follows op -> dependency
        assert cycle is not None, "only called on a cycle"
        return list(reversed(cycle))  # in data-flow order

    # -- queries -----------------------------------------------------------------------------

    def __getitem__(self, name: str) -> Op:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"graph {self.name!r} has no op {name!r}; ops: {', '.join(self.order)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self):
        """The ops in topological order."""
        return (self._by_name[name] for name in self.order)

    def __len__(self) -> int:
        return len(self.ops)

    def of_kind(self, kind: OpKind) -> tuple[Op, ...]:
        """The ops of one kind, in topological order."""
        return tuple(op for op in self if op.kind is kind)

    def of_role(self, role: str) -> tuple[Op, ...]:
        """The ops with one role, in topological order."""
        return tuple(op for op in self if op.role == role)

    def cost(self, shape: Shape) -> dict[str, Any]:
        """Each op's evaluated cost for ``shape``, in topological order."""
        return {op.name: op.cost(shape) for op in self}

    # -- transformations ---------------------------------------------------------------------

    def bind(self, fns: Mapping[str, Callable[..., Any]]) -> Graph:
        """A copy whose ops named in ``fns`` run those callables."""
        unknown = set(fns) - set(self._by_name)
        if unknown:
            raise GraphError(f"graph {self.name!r}: cannot bind unknown op(s) {sorted(unknown)}")
        return attrs.evolve(self, ops=[op.with_fn(fns.get(op.name, op.fn)) for op in self.ops])

    def fuse(self, names: Iterable[str], into: str, *, role: str = "") -> Graph:
        """A copy where the compute ops ``names`` become one op ``into`` with their summed cost.

        The new op reads what the group reads from outside and writes what is used outside it.
        If every fused op has a callable, the new op runs them in dependency order.
        """
        names = list(names)
        group = [self[n] for n in names]
        if not group:
            raise GraphError(f"graph {self.name!r}: fuse needs at least one op")
        bad = [op.name for op in group if op.kind is not OpKind.COMPUTE]
        if bad:
            raise GraphError(f"graph {self.name!r}: only compute ops can be fused (not {bad})")
        group.sort(key=lambda op: self.order.index(op.name))
        inside = set(names)
        written = {v for op in group for v in op.writes}
        reads = tuple(dict.fromkeys(v for op in group for v in op.reads if v not in written))
        used_outside = {v for op in self.ops if op.name not in inside for v in op.reads}
        used_outside |= set(self.outputs)
        writes = tuple(v for op in group for v in op.writes if v in used_outside)
        cost = sum((op.cost for op in group), FREE)
        fn = _sequence(group, reads, writes) if all(op.fn for op in group) else None
        fused = Op(into, OpKind.COMPUTE, reads, writes, cost=cost, role=role or into, fn=fn)
        first = min(self.ops.index(op) for op in group)
        ops = [op for op in self.ops if op.name not in inside]
        ops.insert(first, fused)
        return attrs.evolve(self, ops=ops)

    # -- rendering and serialisation -----------------------------------------------------------

    def render(self, shape: Shape | None = None) -> str:
        """A table of the ops in dependency order; with ``shape``, their cost figures too."""
        rows = [["op", "kind", "role", "reads -> writes"]]
        if shape is not None:
            rows[0] += ["GFLOP", "vec GFLOP", "HBM MB", "comm MB"]
        for op in self:
            row = [op.name, op.describe(), op.role, f"{', '.join(op.reads)} -> {', '.join(op.writes)}"]
            if shape is not None:
                c = op.cost(shape)
                row += [f"{c.flops / 1e9:.3f}", f"{c.vector_flops / 1e9:.3f}",
                        f"{c.hbm_bytes / 1e6:.2f}", f"{c.comm_bytes / 1e6:.2f}"]
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"graph {self.name}: {', '.join(self.inputs)} -> {', '.join(self.outputs)}"]
        if shape is not None:
            lines[0] += f"  (shape: {shape.tokens} tokens, {shape.requests} requests)"
        for row in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form; callables are not serialised."""
        return {
            "schema": SCHEMA,
            "name": self.name,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "ops": [_op_to_dict(op) for op in self.ops],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Graph:
        """Inverse of :meth:`to_dict`; malformed data raises :class:`GraphError`."""
        _check_schema(data, SCHEMA, "an ops graph")
        try:
            name, ops = data["name"], data["ops"]
            if not isinstance(name, str):
                raise GraphError(f"graph 'name' must be a string (got {name!r})")
            for field in ("ops", "inputs", "outputs"):
                if not isinstance(data[field], list) or not all(
                        isinstance(v, Mapping if field == "ops" else str) for v in data[field]):
                    what = "objects" if field == "ops" else "strings"
                    raise GraphError(f"graph {name!r}: {field!r} must be a list of {what}")
            return cls(name, [_op_from_dict(d) for d in ops], data["inputs"], data["outputs"])
        except KeyError as exc:
            raise GraphError(f"graph JSON is missing the field {exc.args[0]!r}") from None

    def to_json(self) -> str:
        """Stable JSON: the same graph always gives the same text."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Graph:
        return cls.from_dict(load_json(text, "graph", GraphError))


def _sequence(group: list[Op], reads: tuple[str, ...], writes: tuple[str, ...]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        env = dict(zip(reads, args))
        for op in group:
            out = op.fn(*(env[v] for v in op.reads))
            env.update(zip(op.writes, out if len(op.writes) > 1 else (out,)))
        result = tuple(env[v] for v in writes)
        return result if len(result) > 1 else result[0]

    return run


def _op_to_dict(op: Op) -> dict[str, Any]:
    out: dict[str, Any] = {"name": op.name, "kind": op.kind.value, "reads": list(op.reads),
                           "writes": list(op.writes), "role": op.role}
    if op.comm is not None:
        out["comm"] = {"collective": op.comm.collective.value, "group": op.comm.group,
                       "size": op.comm.size}
        if op.comm.routing is not None:
            out["comm"]["routing"] = attrs.asdict(op.comm.routing)
    cost = op.cost.to_dict()
    if cost:
        out["cost"] = cost
    return out


def _check_schema(data: Any, schema: str, what: str) -> None:
    if not isinstance(data, Mapping):
        raise GraphError(f"not {what}: expected a JSON object (got {type(data).__name__})")
    if data.get("schema") != schema:
        raise GraphError(f"not {what}: 'schema' must be {schema!r} (got {data.get('schema')!r})")


def load_json(text: str | bytes, what: str, error: type[Exception]) -> Any:
    """``json.loads`` whose failures (bad syntax, nesting too deep for the parser) raise
    ``error`` saying which ``what`` could not be read."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} JSON is not valid JSON: {exc}") from None
    except RecursionError:
        raise error(f"{what} JSON is nested too deeply to read") from None
    except (TypeError, UnicodeDecodeError) as exc:
        raise error(f"{what} JSON cannot be read: {exc}") from None


def _op_from_dict(data: Mapping[str, Any]) -> Op:
    name = data.get("name", "?")
    try:
        kind = OpKind(data["kind"])
    except KeyError:
        raise GraphError(f"op {name!r}: missing the field 'kind'") from None
    except (ValueError, TypeError):
        valid = ", ".join(k.value for k in OpKind)
        raise GraphError(f"op {name!r}: unknown kind {data['kind']!r}; valid: {valid}") from None
    try:
        comm = _comm_from_dict(data["comm"]) if "comm" in data else None
        cost = OpCost.from_dict(data.get("cost", {}))
        reads, writes, role = data.get("reads", ()), data.get("writes", ()), data.get("role", "")
        if not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in (reads, writes)):
            raise GraphError(f"op {name!r}: 'reads' and 'writes' must be lists of value names")
        if not isinstance(role, str):
            raise GraphError(f"op {name!r}: 'role' must be a string (got {role!r})")
        return Op(name, kind, reads, writes, comm=comm, cost=cost, role=role)
    except GraphError:
        raise
    except (TypeError, ValueError, AttributeError) as exc:
        raise GraphError(f"op {name!r}: {exc}") from None


def _comm_from_dict(data: Any) -> Comm:
    if not isinstance(data, Mapping) or not isinstance(data.get("group"), str) or not (
            isinstance(data.get("size", 1), int) and not isinstance(data.get("size", 1), bool)):
        raise GraphError(f"'comm' must be an object with 'collective', a string 'group' and an "
                         f"integer 'size' (got {data!r})")
    return Comm(**data)


@attrs.frozen
class ModelGraph:
    """A model's layers in order; layer L's outputs feed layer L+1's inputs by position.

    Identical layers share one :class:`Graph` object, so a 61-layer model costs little.
    """

    name: str
    layers: tuple[Graph, ...] = attrs.field(converter=tuple)

    def __attrs_post_init__(self) -> None:
        if not self.layers:
            raise GraphError(f"model {self.name!r} has no layers")
        for i, (a, b) in enumerate(zip(self.layers, self.layers[1:])):
            if len(a.outputs) != len(b.inputs):
                raise GraphError(
                    f"model {self.name!r}: layer {i} ({a.name}) has {len(a.outputs)} outputs but "
                    f"layer {i + 1} ({b.name}) takes {len(b.inputs)} inputs"
                )

    def __len__(self) -> int:
        return len(self.layers)

    def distinct(self) -> tuple[Graph, ...]:
        """Each different layer graph once, in order of first appearance."""
        return tuple({id(g): g for g in self.layers}.values())

    def __str__(self) -> str:
        runs: list[list[Any]] = []
        for i, g in enumerate(self.layers):
            if runs and runs[-1][0] == g:
                runs[-1][2] = i
            else:
                runs.append([g, i, i])
        spans = ", ".join(f"{a}-{b}: {g.name}" if a != b else f"{a}: {g.name}" for g, a, b in runs)
        return f"model {self.name} ({len(self.layers)} layers; {spans})"

    def to_dict(self) -> dict[str, Any]:
        graphs = self.distinct()
        index = {id(g): i for i, g in enumerate(graphs)}
        return {"schema": MODEL_SCHEMA, "name": self.name,
                "graphs": [g.to_dict() for g in graphs],
                "layers": [index[id(g)] for g in self.layers]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelGraph:
        """Inverse of :meth:`to_dict`; malformed data raises :class:`GraphError`."""
        _check_schema(data, MODEL_SCHEMA, "a model graph")
        try:
            name, graphs, layers = data["name"], data["graphs"], data["layers"]
        except KeyError as exc:
            raise GraphError(f"model graph JSON is missing the field {exc.args[0]!r}") from None
        if not isinstance(name, str):
            raise GraphError(f"model 'name' must be a string (got {name!r})")
        if not isinstance(graphs, list) or not graphs:
            raise GraphError(f"model {name!r}: 'graphs' must be a non-empty list of graphs")
        graphs = [Graph.from_dict(g) for g in graphs]
        if not isinstance(layers, list):
            raise GraphError(f"model {name!r}: 'layers' must be a list of graph indices")
        for i, index in enumerate(layers):
            # bool is an int in Python; a negative index would silently pick from the end.
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(graphs):
                raise GraphError(f"model {name!r}: layer {i} names graph {index!r}; valid: "
                                 f"0..{len(graphs) - 1} (an index into 'graphs')")
        return cls(name, [graphs[i] for i in layers])
