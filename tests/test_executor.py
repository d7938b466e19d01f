"""The executor runs any plan to the same outputs as the graph's ops called in plain order."""

from __future__ import annotations

import gc
import weakref

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlap.backends import Executor
from overlap.errors import ConfigError
from overlap.ops_graph import Graph, ModelGraph, Op, OpKind
from overlap.ops_graph.templates import ParallelConfig, build_model
from overlap.plan import NAMED, STRATEGIES, Batch, build_plan, split
from overlap.search import search
from tests.strategies import graphs

BACKENDS = ("inline", "threads")
# The hand-written schedules; ``auto`` searches (slowly) among them, so random graphs skip it.
FIXED = sorted(NAMED)


def mix(n_writes: int):
    """A row-independent op: each output row is an integer function of the same input rows."""

    def fn(*args):
        acc = args[0]
        for k, a in enumerate(args[1:]):
            acc = acc * 3 + a * (k + 2)
        outs = tuple((acc + j) % 1009 for j in range(n_writes))
        return outs if n_writes > 1 else outs[0]

    return fn


def list_mix(n_writes: int):
    """``mix`` over lists of ints, element by element."""

    def fn(*args):
        acc = list(args[0])
        for k, a in enumerate(args[1:]):
            acc = [x * 3 + y * (k + 2) for x, y in zip(acc, a)]
        outs = tuple([(x + j) % 1009 for x in acc] for j in range(n_writes))
        return outs if n_writes > 1 else outs[0]

    return fn


def bind(model: ModelGraph, make=mix) -> ModelGraph:
    bound = {id(g): g.bind({op.name: make(len(op.writes)) for op in g}) for g in model.distinct()}
    return ModelGraph(model.name, [bound[id(g)] for g in model.layers])


def plain_forward(model: ModelGraph, inputs: dict) -> dict:
    """The reference: every op of every layer in topological order on the whole batch."""
    values = [inputs[name] for name in model.layers[0].inputs]
    for graph in model.layers:
        env = dict(zip(graph.inputs, values))
        for op in graph:
            out = op.fn(*(env[v] for v in op.reads))
            env.update(zip(op.writes, out if len(op.writes) > 1 else (out,)))
        values = [env[v] for v in graph.outputs]
    return dict(zip(model.layers[-1].outputs, values))


def deepseek(attention: str = "one", make=mix) -> ModelGraph:
    return bind(build_model("deepseek-v3", ParallelConfig(ep=16), num_layers=4,
                            attention=attention), make)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_matches_the_plain_forward_with_torch(strategy: str, backend: str) -> None:
    """Each built-in strategy's plan gives bitwise the plain forward's tensors on CPU backends."""
    torch = pytest.importorskip("torch")
    model = deepseek(attention="fine")
    gen = torch.Generator().manual_seed(0)
    inputs = {"hidden": torch.randint(0, 1000, (48, 16), generator=gen),
              "residual": torch.randint(0, 1000, (48, 16), generator=gen)}
    batch = Batch.prefill(48, 6)
    if STRATEGIES[strategy].build is None:  # auto: searched on a preset
        plan = search(model, batch, "910b2", progress=False).plan
    else:
        plan = build_plan(strategy, model, split(batch, 2))
    with Executor(plan, backend) as ex:
        out = ex.run(inputs)
    ref = plain_forward(model, inputs)
    assert list(out) == list(ref)
    for name in ref:
        assert torch.equal(out[name], ref[name]), f"{name} differs under\n{plan}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_request_cut_between_microbatches_matches(backend: str) -> None:
    """A split that cuts a request in two still reproduces the plain forward."""
    torch = pytest.importorskip("torch")
    model = deepseek(attention="two_stage")
    plan = build_plan("deepseek_prefill", model, split(Batch.prefill(30, 1), 2, split_requests=True))
    assert plan.split.micro[1].continues_request
    inputs = {"hidden": torch.arange(30 * 4).reshape(30, 4), "residual": torch.ones(30, 4, dtype=torch.long)}
    with Executor(plan, backend) as ex:
        out = ex.run(inputs)
    assert all(torch.equal(out[k], v) for k, v in plain_forward(model, inputs).items())


def one_layer_model(graph: Graph) -> ModelGraph:
    """The random graph as a model: repeated for 3 layers when its outputs can feed its inputs."""
    return ModelGraph("random", [graph] * (3 if len(graph.outputs) == len(graph.inputs) else 1))


@settings(max_examples=100, deadline=None)
@given(graph=graphs(), strategy=st.sampled_from(FIXED), n_micro=st.integers(1, 3),
       tokens=st.integers(3, 12), backend=st.sampled_from(BACKENDS))
def test_random_graphs_match_the_plain_forward(graph, strategy, n_micro, tokens, backend) -> None:
    """Any valid graph, planned by any strategy, executes to the plain forward on int lists."""
    model = bind(one_layer_model(graph), list_mix)
    n_micro = 2 if strategy.startswith("deepseek_") else n_micro  # DeepSeek's schedules take 2
    plan = build_plan(strategy, model, split(Batch.prefill(tokens, 3), n_micro))
    inputs = {name: [(7 * t + 3 * k) % 101 for t in range(tokens)]
              for k, name in enumerate(model.layers[0].inputs)}
    with Executor(plan, backend) as ex:
        out = ex.run(inputs)
    assert out == plain_forward(model, inputs), str(plan)


def test_the_same_executor_runs_repeatedly() -> None:
    """A second run on new inputs gives the new inputs' outputs (nothing stale is reused)."""
    model = deepseek(make=list_mix)
    plan = build_plan("sglang_tbo", model, split(Batch.prefill(8, 2), 2))
    ex = Executor(plan)
    for seed in (1, 2):
        inputs = {"hidden": [seed * t for t in range(8)], "residual": [t + seed for t in range(8)]}
        assert ex.run(inputs) == plain_forward(model, inputs)


def chain_model(fns: dict) -> ModelGraph:
    """One layer ``x -> a -> b -> c`` with the given callables."""
    ops = [Op("first", OpKind.COMPUTE, "x", "a"), Op("second", OpKind.COMPUTE, "a", "b"),
           Op("third", OpKind.COMPUTE, "b", "c")]
    return ModelGraph("chain", [Graph("chain", ops, "x", "c").bind(fns)])


def test_a_value_is_freed_after_its_last_reader() -> None:
    """The executor drops a value as soon as no later step reads it."""

    class Box(list):
        pass

    seen = {}

    def first(x):
        box = Box(x)
        seen["a"] = weakref.ref(box)
        return box

    def third(b):
        gc.collect()
        seen["alive_at_third"] = seen["a"]() is not None
        return b

    model = chain_model({"first": first, "second": lambda a: list(a), "third": third})
    Executor(build_plan("sequential", model, split(Batch.prefill(4, 1), 1))).run({"x": [1, 2, 3, 4]})
    assert seen["alive_at_third"] is False


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_value_its_last_reader_consumed_is_released_inside_that_readers_context(
        backend: str) -> None:
    """A value whose last reader is an op is released before that op's ``context`` exits (the
    op's work, as when a module drops what it consumed), not after it; one read later is not."""

    class Box(list):
        pass

    refs: dict[str, weakref.ref] = {}
    alive_at_exit: dict[str, bool] = {}

    def first(x):
        box = Box(x)
        refs["a"] = weakref.ref(box)
        return box

    class Context:
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, m):
            return self

        def __enter__(self) -> None:
            self.calls += 1

        def __exit__(self, *exc) -> None:
            if self.calls == 2:  # second's call: it read "a" last
                alive_at_exit["a"] = refs["a"]() is not None

    model = chain_model({"first": first, "second": lambda a: list(a), "third": list})
    plan = build_plan("sequential", model, split(Batch.prefill(4, 1), 1))
    with Executor(plan, backend) as ex:
        assert ex.run({"x": [1, 2, 3, 4]}, context=Context()) == {"c": [1, 2, 3, 4]}
    assert alive_at_exit == {"a": False}


def test_an_op_without_a_callable_is_refused_before_anything_runs() -> None:
    """Running a plan whose ops are unbound names them and runs nothing."""
    calls = []
    model = chain_model({"first": lambda x: calls.append(x) or x})
    plan = build_plan("sequential", model, split(Batch.prefill(4, 1), 1))
    with pytest.raises(ConfigError, match=r"^cannot execute plan 'sequential': op\(s\) 'second' "
                                          r"\(layer 0\), 'third' \(layer 0\) have no callable; "):
        Executor(plan).run({"x": [1, 2, 3, 4]})
    assert calls == []


def test_inputs_must_be_the_first_layers_graph_inputs() -> None:
    """A missing or unknown input name is reported with the expected names."""
    model = chain_model({"first": list, "second": list, "third": list})
    plan = build_plan("sequential", model, split(Batch.prefill(4, 1), 1))
    with pytest.raises(ConfigError, match=r"^executor inputs must be exactly layer 0's graph inputs "
                                          r"\(x\); missing: \['x'\], unknown: \['y'\]$"):
        Executor(plan).run({"y": [1]})


def test_layers_passed_to_run_replace_the_plans_callables() -> None:
    """``layers=`` runs other bound graphs with the same ops."""
    model = chain_model({"first": list, "second": list, "third": list})
    plan = build_plan("sequential", model, split(Batch.prefill(3, 1), 1))
    doubled = [model.layers[0].bind({"third": lambda b: [2 * v for v in b]})]
    ex = Executor(plan)
    assert ex.run({"x": [1, 2, 3]}, layers=doubled) == {"c": [2, 4, 6]}
    assert ex.run({"x": [1, 2, 3]}) == {"c": [1, 2, 3]}


def test_layers_of_the_wrong_count_are_refused() -> None:
    """``layers=`` must hold one graph per planned layer."""
    model = chain_model({"first": list, "second": list, "third": list})
    plan = build_plan("sequential", model, split(Batch.prefill(3, 1), 1))
    with pytest.raises(ConfigError,
                       match=r"^'layers' must hold 1 graphs, one per layer of the plan \(got 2\)$"):
        Executor(plan).run({"x": [1, 2, 3]}, layers=list(model.layers) * 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_context_is_entered_around_each_op_with_its_microbatch(backend: str) -> None:
    """``context(m)`` wraps every op call of microbatch m, on whatever thread runs it."""
    import contextlib

    log = []

    @contextlib.contextmanager
    def context(m):
        log.append(("enter", m))
        yield
        log.append(("exit", m))

    model = chain_model({"first": list, "second": list, "third": list})
    plan = build_plan("sglang_tbo", model, split(Batch.prefill(4, 2), 2))
    with Executor(plan, backend) as ex:
        ex.run({"x": [1, 2, 3, 4]}, context=context)
    assert sorted(log) == sorted([("enter", m) for m in (0, 1)] * 3 + [("exit", m) for m in (0, 1)] * 3)


def test_take_and_join_are_used_for_splitting_and_merging() -> None:
    """Custom ``take`` slices inputs and custom ``join`` merges the microbatch outputs."""
    model = chain_model({"first": list, "second": list, "third": list})
    plan = build_plan("sglang_tbo", model, split(Batch.prefill(4, 2), 2))
    out = Executor(plan).run({"x": "abcd"}, take=lambda v, a, b: list(v[a:b]),
                             join=lambda parts: "|".join("".join(p) for p in parts))
    assert out == {"c": "ab|cd"}


def test_a_host_op_runs_after_what_it_reads_is_complete() -> None:
    """A HOST op (``.tolist()``-like) sees its input written, on the threads backend too."""
    ops = [Op("produce", OpKind.COMPUTE, "x", "a"),
           Op("to_host", OpKind.HOST, "a", "n"),
           Op("use", OpKind.COMPUTE, ("n", "x"), "y")]
    model = ModelGraph("host", [Graph("host", ops, "x", "y").bind(
        {"produce": lambda x: [v + 1 for v in x], "to_host": lambda a: [sum(a)] * len(a),
         "use": lambda n, x: [p + q for p, q in zip(n, x)]})])
    plan = build_plan("sglang_tbo", model, split(Batch.prefill(4, 2), 2))
    with Executor(plan, "threads") as ex:
        assert ex.run({"x": [1, 2, 3, 4]}) == {"y": [6, 7, 12, 13]}
