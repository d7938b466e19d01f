"""The vLLM adapter's per-step host path, without an engine: its timer, its reusable scopes, the
caches it keeps between steps (a changed shape must never reuse a stale entry) and the cheap
forward-context copy, which must equal ``dataclasses.replace``.

The engine runs (tokens and logprobs equal the stock forward's) are in tests/test_vllm_plugin.py.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter, OrderedDict
from types import SimpleNamespace

import pytest

from overlap.integrations.vllm import timing
from overlap.integrations.vllm.adapter import DeepseekOverlap, _HostScope, shape_bucket
from overlap.integrations.vllm.config import OverlapConfig
from overlap.integrations.vllm.graph import layer_graph
from overlap.ops_graph.graph import ModelGraph
from overlap.plan import Batch, split


class FakeClock:
    """Both clocks of ``timing``: each reading returns the next value given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, wall: list[float], cpu: list[float]):
        self.wall, self.cpu = list(wall), list(cpu)
        monkeypatch.setattr(timing, "perf_counter", lambda: self.wall.pop(0))
        monkeypatch.setattr(timing, "thread_time", lambda: self.cpu.pop(0))


def test_sections_are_the_time_between_laps_less_op_time(monkeypatch) -> None:
    """A section is the time since the previous lap minus the op calls inside it; sections
    add up to the step's total, and the op time is not carried into the next section."""
    # start 0 | op 1..4 (3 s) | lap decide at 6 | op 7..8 | lap dispatch at 10 | lap finish 12
    FakeClock(monkeypatch, wall=[0, 1, 4, 6, 7, 8, 10, 12], cpu=[0, 1, 3, 5, 6, 6.5, 8, 9])
    timer = timing.HostTimer()
    scope = timing.TimedScope(threading.local(), 1, timer)
    timer.start()
    with scope:
        assert scope.local.micro == 1
    timer.lap("decide")
    with scope:
        pass
    timer.lap("dispatch")
    timer.lap("finish")
    timer.done()
    ms = {s: timer.wall_ms[s][0] / 1e3 for s in timing.SECTIONS}
    cpu = {s: timer.cpu_ms[s][0] / 1e3 for s in timing.SECTIONS}
    assert ms == {"decide": 3, "metadata": 0, "contexts": 0, "dispatch": 3, "finish": 2}
    assert cpu == {"decide": 3, "metadata": 0, "contexts": 0, "dispatch": 2.5, "finish": 1}
    assert timer.totals() == [8e3] and timer.totals(cpu=True) == [6.5e3] and timer.steps == 1


def test_a_step_that_falls_back_keeps_no_sections_and_clear_forgets(monkeypatch) -> None:
    """Only steps that reach ``done`` are kept (a fallback step's laps are dropped by the
    next ``start``); ``clear`` forgets every kept step."""
    FakeClock(monkeypatch, wall=[0, 1, 10, 12, 15], cpu=[0, 1, 10, 12, 15])
    timer = timing.HostTimer()
    timer.start()
    timer.lap("decide")  # then the step fell back: no done()
    timer.start()
    timer.lap("decide")
    timer.done()
    assert timer.wall_ms["decide"] == [2e3] and timer.steps == 1
    timer.clear()
    assert timer.steps == 0 and timer.totals() == []


def test_host_scopes_are_reused_and_switch_with_timing() -> None:
    """One scope per microbatch is kept for each mode; timing picks the timed set, and the set
    grows when a step has more microbatches than any before."""
    fake = SimpleNamespace(_scope_sets={False: [], True: []}, _local=threading.local(),
                           host=timing.HostTimer())
    plain = DeepseekOverlap._scopes(fake, 2, False)
    assert [type(s) for s in plain] == [_HostScope, _HostScope]
    assert DeepseekOverlap._scopes(fake, 2, False) is plain and len(plain) == 2
    timed = DeepseekOverlap._scopes(fake, 3, True)
    assert [type(s) for s in timed] == [timing.TimedScope] * 3
    assert [s.micro for s in timed] == [0, 1, 2] and all(s.timer is fake.host for s in timed)
    with plain[1]:
        assert fake._local.micro == 1


def _executor_owner() -> SimpleNamespace:
    """What ``DeepseekOverlap._executor`` reads, for a 1-layer dense graph (no vLLM needed)."""
    graph = layer_graph(moe="dense", tp=1, ep=1, shared=False)
    owner = SimpleNamespace(
        _bucket=(None, ()), record=False, _trace=None, config=OverlapConfig(strategy="vllm_dbo"),
        _executors=OrderedDict(), _layers=(graph,), _templates={},
        _model_graph=ModelGraph("deepseek", [graph]), backend_name="inline", stats=Counter(),
        unsupported="")
    owner._template = lambda key, planned: DeepseekOverlap._template(owner, key, planned)
    return owner


def test_executor_cache_never_serves_a_stale_bucket() -> None:
    """The last split's bucket is remembered by identity: the same split object reuses it, a
    new split with the same bucket shares the executor, and a split of another bucket gets its
    own executor, built for its own split (not the previous step's)."""
    owner = _executor_owner()
    small = split(Batch.of([(8, 0)] * 4), 2, min_tokens=1)  # 16 | 16 tokens: bucket (2, 16, 16)
    same_bucket = split(Batch.of([(4, 0)] * 6), 2, min_tokens=1)  # 12 | 12
    large = split(Batch.of([(40, 0)] * 4), 2, min_tokens=1)  # 80 | 80: bucket (2, 128, 128)
    assert shape_bucket(small) == shape_bucket(same_bucket) != shape_bucket(large)
    first = DeepseekOverlap._executor(owner, small)
    assert DeepseekOverlap._executor(owner, small) is first
    assert DeepseekOverlap._executor(owner, same_bucket) is first
    other = DeepseekOverlap._executor(owner, large)
    assert other is not first and other.plan.split is large
    assert DeepseekOverlap._executor(owner, small) is first
    assert owner.stats["executors_built"] == 2
    for executor in owner._executors.values():
        executor.close()


@pytest.mark.vllm
def test_forward_context_copy_equals_dataclasses_replace() -> None:
    """The adapter's per-microbatch forward context has exactly the fields and values
    ``dataclasses.replace`` gives, and is a new object."""
    pytest.importorskip("vllm")
    from vllm.forward_context import ForwardContext

    from overlap.integrations.vllm.metadata import _replacer

    ctx = ForwardContext(no_compile_layers={"a": 1}, attn_metadata={"l0": "whole"},
                         slot_mapping={"l0": "all"}, moe_layer_index=3)
    changes = {"attn_metadata": {"l0": "mb0"}, "slot_mapping": {"l0": "rows"}}
    mine, theirs = _replacer(ctx)(changes), dataclasses.replace(ctx, **changes)
    assert type(mine) is ForwardContext and mine is not ctx
    assert mine.__dict__ == theirs.__dict__
    assert ctx.attn_metadata == {"l0": "whole"}  # the step's context is left as it was


def test_dataclasses_with_non_init_fields_go_through_replace() -> None:
    """A non-init field is reset by ``dataclasses.replace``; the copy must not keep it."""
    from overlap.integrations.vllm.metadata import _replacer

    @dataclasses.dataclass
    class Ctx:
        value: int
        derived: int = dataclasses.field(init=False, default=0)

    ctx = Ctx(1)
    ctx.derived = 5
    new = _replacer(ctx)({"value": 2})
    assert (new.value, new.derived) == (2, 0) == (dataclasses.replace(ctx, value=2).value, 0)


@pytest.mark.vllm
def test_layers_sharing_a_slot_mapping_share_its_slice() -> None:
    """Per microbatch, layers whose slot mapping is one tensor get one slice of it; a layer
    with its own tensor gets its own slice; every slice holds that microbatch's rows."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    from vllm.forward_context import ForwardContext

    from overlap.integrations.vllm.metadata import microbatch_contexts

    shared, own = torch.arange(24), torch.arange(100, 124)
    whole = object()
    ctx = ForwardContext(no_compile_layers={}, attn_metadata={"l0": whole, "l1": whole},
                         slot_mapping={"l0": shared, "l1": shared, "l2": own})
    planned = split(Batch.of([(8, 0)] * 3), 2, min_tokens=1)  # rows 0..16 | 16..24
    subs = {id(whole): ["mb0", "mb1"]}
    contexts = microbatch_contexts(ctx, planned, subs, None)
    for m, (c, micro) in enumerate(zip(contexts, planned.micro)):
        a, b = micro.token_start, micro.token_end
        assert c.attn_metadata == {"l0": f"mb{m}", "l1": f"mb{m}"}
        assert c.slot_mapping["l0"] is c.slot_mapping["l1"]
        assert torch.equal(c.slot_mapping["l0"], shared[a:b])
        assert torch.equal(c.slot_mapping["l2"], own[a:b])


def test_timing_on_and_off_between_steps_swaps_the_scopes_ops_run_in() -> None:
    """The inline executor's compiled closures enter the adapter's host scopes through one
    stable lookup; turning timing on and off between steps must swap the scopes they enter.
    Timed, each op's time is taken off the host time (a 3 ms op leaves well under 3 ms of
    dispatch); untimed, ops still see their microbatch, and the timer records nothing."""
    import time

    torch = pytest.importorskip("torch")
    from overlap.backends import Executor
    from overlap.plan import build_plan

    graph = layer_graph(moe="dense", tp=1, ep=1, shared=False)
    seen: list[int] = []
    a = DeepseekOverlap.__new__(DeepseekOverlap)

    def attn(hidden, residual):
        seen.append(a._local.micro)
        time.sleep(0.003)
        return hidden, hidden

    bound = graph.bind({"attn": attn, "post_norm": lambda h, r: (h, r), "mlp": lambda x: x})
    planned = split(Batch.of([(4, 0)] * 4), 2, min_tokens=1)
    executor = Executor(build_plan("vllm_dbo", ModelGraph("deepseek", [graph]), planned), "inline")
    a.model = SimpleNamespace(embed_input_ids=lambda ids: ids.float()[:, None].repeat(1, 4),
                              norm=lambda h, r: (h, r))
    a.host, a.timer, a._layers, a.stats, a._step = timing.HostTimer(), None, (bound,), Counter(), None
    a._local, a._scope_sets = threading.local(), {False: [], True: []}
    a._host_scopes, a._host_timed = [], None
    a._host_context = a._host_scopes.__getitem__
    from overlap.integrations.vllm.metadata import StepViews

    a._views = StepViews()
    ids, positions = torch.arange(16), torch.arange(16)

    def step(timed: bool) -> None:
        a.timer = a.host if timed else None
        if timed:
            a.host.start()
        contexts = [SimpleNamespace(moe_layer_index=0) for _ in range(2)]
        ctx = SimpleNamespace(attn_metadata={}, moe_layer_index=0)
        out = a._run(ctx, planned, executor, contexts, [[], []], ids, positions, None)
        assert torch.equal(out, ids.float()[:, None].repeat(1, 4))
        if timed:
            a.host.done()

    for timed in (False, True, False, True):
        seen.clear()
        step(timed)
        assert sorted(seen) == [0, 1]
    assert a.host.steps == 2
    assert all(ms < 3.0 for ms in a.host.wall_ms["dispatch"]), a.host.wall_ms["dispatch"]
    executor.close()


def test_threads_refuses_a_plan_with_compute_on_two_streams() -> None:
    """Each stream is a thread on ``threads``, and the bound ops share per-layer state (vLLM's
    forward context is one module global): a plan with compute ops on two streams is refused
    there, with the reason, while ``inline`` runs it and ``threads`` runs one-compute-stream
    plans."""
    from tests.test_kv_order import _own_streams

    planned = split(Batch.of([(8, 0)] * 4), 2, min_tokens=1)
    for backend, own, refused in (("threads", True, True), ("inline", True, False),
                                  ("threads", False, False)):
        owner = _executor_owner()
        owner.backend_name = backend
        base = DeepseekOverlap._template(owner, shape_bucket(planned), planned)
        owner._template = lambda key, p, base=base, own=own: _own_streams(base, 1) if own else base
        executor = DeepseekOverlap._executor(owner, planned)
        if refused:
            assert executor is None
            assert owner.unsupported == (
                "on the 'threads' backend, the vllm_dbo plan runs compute ops on 2 streams "
                "(compute, compute_mb1); they would run at once, and the ops share per-layer "
                "state that is not per thread (vLLM's forward context is one module global): "
                "use a plan with one compute stream or the 'inline' backend")
        else:
            assert executor is not None and owner.unsupported == ""
            executor.close()


def test_op_time_from_worker_threads_is_never_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """On ``threads`` op calls end on several worker threads at once; each one's time must
    reach the step (an unguarded ``+=`` loses some when threads switch between its read and
    its write, which a tiny switch interval provokes)."""
    import sys

    timer = timing.HostTimer()
    timer.start()
    monkeypatch.setattr(timing, "perf_counter", lambda: 1.0)  # every op call lasted 1 s
    calls, threads = 20000, 8

    def work() -> None:
        for _ in range(calls):
            timer.op_done((0.0, 0.0))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        workers = [threading.Thread(target=work) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
    finally:
        sys.setswitchinterval(old)
    monkeypatch.setattr(timing, "perf_counter", lambda: 1.0 + calls * threads)
    timer._wall = 0.0
    timer.lap("dispatch")  # elapsed = the op time exactly: nothing left for the section
    assert timer._step["dispatch"][0] == pytest.approx(1.0)
