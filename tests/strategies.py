"""Hypothesis strategies shared by the test modules: random ops graphs and batches."""

from __future__ import annotations

from hypothesis import strategies as st

from overlap.ops_graph import Collective, Comm, Formula, Graph, Op, OpCost, OpKind, Routing

formulas = st.builds(
    Formula,
    const=st.floats(0, 1e9),
    per_token=st.floats(0, 1e9),
    per_request=st.floats(0, 1e6),
    per_context=st.floats(0, 1e6),
    per_pair=st.floats(0, 1e6),
    saturating=st.floats(0, 1e9),
    hit=st.floats(0, 1),
)
@st.composite
def routings(draw: st.DrawFn) -> Routing:
    """An expert routing: top-k of E experts in ``groups`` groups, at most ``max_groups`` used."""
    groups = draw(st.sampled_from([1, 2, 4, 8]))
    experts = groups * draw(st.integers(1, 32))
    return Routing(draw(st.integers(1, min(experts, 9))), experts, groups,
                   draw(st.integers(1, groups)))


@st.composite
def expert_all_to_alls(draw: st.DrawFn) -> tuple[int, int, Routing]:
    """(ranks, ranks per node, routing) of an expert all-to-all whose experts split evenly."""
    per_node = draw(st.sampled_from([1, 2, 4, 8]))
    n = per_node * draw(st.integers(1, 16))
    experts = n * draw(st.integers(1, 4))
    groups = draw(st.sampled_from([g for g in (1, 2, 4, 8) if experts % g == 0]))
    routing = Routing(draw(st.integers(1, min(experts, 9))), experts, groups,
                      draw(st.integers(1, groups)))
    return n, per_node, routing


costs = st.builds(OpCost, flops=formulas, vector_flops=formulas, hbm_bytes=formulas,
                  comm_bytes=formulas, dtype=st.sampled_from(["bf16", "int8", "fp8"]))


@st.composite
def graphs(draw: st.DrawFn, max_ops: int = 12, comm_groups: tuple[str, ...] = ("ep", "tp")) -> Graph:
    """A valid layer graph: each op reads earlier values and writes fresh ones; values that
    nobody reads become graph outputs, so nothing dangles."""
    n_inputs = draw(st.integers(1, 3))
    inputs = [f"in{i}" for i in range(n_inputs)]
    available = list(inputs)
    read: set[str] = set()
    ops = []
    for i in range(draw(st.integers(1, max_ops))):
        reads = draw(st.lists(st.sampled_from(available), min_size=1, max_size=3, unique=True))
        writes = [f"v{i}_{j}" for j in range(draw(st.integers(1, 2)))]
        kind = draw(st.sampled_from(list(OpKind)))
        comm = None
        if kind is OpKind.COMM:
            collective = draw(st.sampled_from(list(Collective)))
            routing = draw(st.none() | routings()) if collective is Collective.ALL_TO_ALL else None
            comm = Comm(collective, draw(st.sampled_from(comm_groups)), draw(st.integers(1, 64)),
                        routing)
        cost = draw(costs) if draw(st.booleans()) else OpCost()
        ops.append(Op(f"op{i}", kind, reads, writes, comm=comm, cost=cost,
                      role=draw(st.sampled_from(["", "attn", "dispatch", "experts"]))))
        read.update(reads)
        available.extend(writes)
    outputs = [v for v in available if v not in read and v not in inputs] or [available[-1]]
    order = draw(st.permutations(ops))
    return Graph(draw(st.sampled_from(["layer", "moe", "g"])), order, inputs, outputs)


requests = st.tuples(st.integers(1, 300), st.integers(0, 5000))


@st.composite
def batches(draw: st.DrawFn, max_requests: int = 12):
    """A batch of 1..max_requests requests: prefill (no context), decode (one token) or mixed."""
    from overlap.plan import Batch

    kind = draw(st.sampled_from(["prefill", "decode", "mixed"]))
    if kind == "prefill":
        pairs = st.tuples(st.integers(1, 300), st.just(0))
    elif kind == "decode":
        pairs = st.tuples(st.just(1), st.integers(1, 5000))
    else:
        pairs = requests
    return Batch.of(draw(st.lists(pairs, min_size=1, max_size=max_requests)))


@st.composite
def models(draw: st.DrawFn, max_layers: int = 3):
    """A model of a random layer graph repeated (when its outputs can feed its inputs)."""
    from overlap.ops_graph import ModelGraph

    graph = draw(graphs())
    layers = draw(st.integers(1, max_layers)) if len(graph.outputs) == len(graph.inputs) else 1
    return ModelGraph("random", [graph] * layers)


# -- trace files (issue 10/11: the trace loader is fuzzed) -----------------------------------------

_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
_json = st.recursive(_json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=12)
_trace_event = st.fixed_dictionaries(
    {"ph": st.sampled_from(["X", "B", "E", "M", "i", 7, None])},
    optional={"cat": st.sampled_from(["kernel", "user_annotation", "cuda_runtime", "cpu_op", 3]),
              "name": st.one_of(st.sampled_from(["void flash::compute_attn_ws<>", "attn(F)",
                                                 "ep::internode::dispatch<x>", "gemm"]), _json),
              "ts": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**7),
                              _json),
              "dur": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**6),
                               _json),
              "tid": st.one_of(st.integers(0, 3), _json), "pid": st.integers(0, 2),
              "args": st.one_of(st.fixed_dictionaries({}, optional={"correlation": st.integers(0, 5)}),
                                _json)})


@st.composite
def trace_files(draw: st.DrawFn) -> bytes:
    """The bytes of a trace-like file: a valid trace, one with random events, random JSON, or
    such text cut short, gzipped or not."""
    import gzip
    import json

    events = draw(st.lists(st.one_of(_trace_event, _json), max_size=8))
    doc = draw(st.sampled_from(["object", "list", "json"]))
    value = {"traceEvents": events} if doc == "object" else events if doc == "list" else draw(_json)
    data = json.dumps(value).encode()
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        data = gzip.compress(data)
        if draw(st.booleans()):
            data = data[:draw(st.integers(0, len(data)))]
    return data


# -- loader fuzzing: random JSON and random edits of valid documents ------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
                | st.sampled_from([0, 1, -1, 2, 256, 1 << 21, "", "0", "ep", "comm", "compute"]))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)


def _paths(doc, prefix=()):
    """Every path (tuple of keys and indices) to a value inside ``doc``, the root included."""
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, (*prefix, i))


@st.composite
def mutated(draw: st.DrawFn, doc):
    """A deep copy of the JSON document ``doc`` with 1-3 random edits: a value replaced (by
    random JSON or a near miss: its negation, a string of it, null), a key deleted, or a list
    element dropped or duplicated. Most edits keep the document almost valid, which is where
    loaders crack."""
    import copy

    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        if not path:
            doc = draw(json_values)
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key, old = path[-1], parent[path[-1]]
        edit = draw(st.sampled_from(["replace", "near", "delete", "duplicate"]))
        if edit == "replace":
            parent[key] = draw(json_values)
        elif edit == "near":
            near = [None, str(old), [old], True]
            if isinstance(old, int | float) and not isinstance(old, bool):
                near += [-old, old + 0.5, old * 10**9, -1]
            parent[key] = draw(st.sampled_from(near))
        elif edit == "delete" or not isinstance(parent, list):
            del parent[key]
        else:
            parent.insert(key, copy.deepcopy(old))
    return doc


csv_cells = st.sampled_from(["", "attn", "dispatch", "1.5", "-3", "nan", "inf", "1e400", "x",
                             "compute", "comm", "host", "gpu", '"q"', "0", " 7 "])


@st.composite
def csv_texts(draw: st.DrawFn) -> str:
    """CSV-like text: usually the ``op,duration_us[,kind]`` header, then rows of odd cells."""
    header = draw(st.sampled_from(["op,duration_us", "op,duration_us,kind", "op", "x,y",
                                   "op,duration_us,kind,extra", ""]))
    rows = draw(st.lists(st.lists(csv_cells, min_size=0, max_size=4), max_size=6))
    body = "\n".join(",".join(r) for r in rows)
    return header + "\n" + body + draw(st.sampled_from(["", "\n", "\r\n", "\x00", "\ufeff"]))
