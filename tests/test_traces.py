"""Kernel traces as calibration input: streamed reading, segmenting, mapping, bad files.

The fixture ``tests/data/deepseek-train-kernels.json.gz`` is an excerpt of ``train.json`` of the
public repository deepseek-ai/profile-data (commit 4496024; H800, EP64, DeepGEMM FP8, DeepEP
normal kernels; one DualPipe forward+backward chunk pair of 4 MoE layers): its device kernels,
user annotations and the runtime launches of those kernels, nothing else.
"""

from __future__ import annotations

import gzip
import json
import re
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from overlap.backends.timeline import kernel_timeline
from overlap.cost import load_measurements, trace_json
from overlap.cost.traces import (
    DEEPSEEK_H800,
    KernelTable,
    load_kernel_table,
    profile,
    read_kernel_trace,
    table_from_dict,
)
from overlap.errors import ConfigError, OverlapError
from overlap.report import metrics
from tests.strategies import trace_files

FIXTURE = Path(__file__).parent / "data" / "deepseek-train-kernels.json.gz"
FORWARD_OPS = {"input_norm", "q_a", "q_norm", "q_b", "q_rope", "kv_a", "kv_prep", "kv_b",
               "kv_expand", "core_attn", "o_proj", "gate", "dispatch", "permute", "experts",
               "unpermute", "combine", "shared", "q_a_quant", "kv_a_quant", "q_b_quant",
               "kv_b_quant", "o_proj_quant", "ffn_quant"}


@pytest.fixture(scope="module")
def train():
    return profile(read_kernel_trace(FIXTURE))


def test_the_stream_reader_gives_what_json_load_gives(tmp_path):
    """Event for event, the streamed parse equals ``json.load`` (plain and gzip, tiny chunks)."""
    events = json.loads(gzip.decompress(FIXTURE.read_bytes()))["traceEvents"]
    assert list(trace_json.iter_events(FIXTURE)) == events
    plain = tmp_path / "t.json"
    plain.write_bytes(gzip.decompress(FIXTURE.read_bytes()))
    assert list(trace_json.iter_events(plain)) == events


def test_small_chunks_split_values_anywhere(tmp_path, monkeypatch):
    """Values cut across chunk boundaries (numbers, strings, escapes) are joined correctly."""
    monkeypatch.setattr(trace_json, "CHUNK", 7)
    doc = {"a": [1, {"b": "x\\u00e9\"y"}], "traceEvents": [{"ts": 123456789.25, "name": "é" * 9},
                                                           12345678901234567890, [], {}]}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc, ensure_ascii=False))
    assert list(trace_json.iter_events(path)) == doc["traceEvents"]


def test_the_deepseek_train_trace_maps_every_forward_kernel(train):
    """Kernels only (963 of the trace's 14,240 events); the DeepEP stream is the comm stream;
    4 layers from the annotations; every forward kernel is named by the shipped table, and the
    backward chunk's time (and training's FP8 activation caching) is reported as unmodelled, not
    dropped."""
    assert len(train.kernels) == 963
    assert train.comm_streams == (27,) and set(train.compute_streams) == {7, 23}
    assert train.layers == (0, 1, 2, 3)
    forward = [m for m in train.kernels if m.segment and m.segment.endswith("(F)")]
    assert forward and all(m.op is not None or m.role == "fp8_cache" for m in forward)
    assert {m.op for m in forward} - {None} == FORWARD_OPS
    unmodelled = train.unmodelled()
    assert set(unmodelled) == {"backward", "fp8_cache"} and unmodelled["backward"] > 0.1  # 147 ms
    total = sum(m.kernel.dur_us for m in train.kernels) * 1e-6
    mapped = sum(train.op_seconds().values())
    assert mapped + sum(unmodelled.values()) == pytest.approx(total)


def test_fp8_casts_and_moe_permutes_are_their_own_ops(train):
    """Each FP8 cast (and the transpose of its scales) belongs to the cast op before its GEMM, the
    MoE index/expand kernels to ``permute``, the weighted reduce to ``unpermute``; training's
    activation caching (E5M6 attention output, FP8 SwiGLU inputs) is unmodelled ``fp8_cache``."""
    def ops(fragment: str) -> set:
        return {m.op for m in train.kernels if fragment in m.kernel.name
                and m.segment and m.segment.endswith("(F)")}

    assert ops("expand_to_fused") == ops("get_fused_mapping") == {"permute"}
    assert ops("clean_and_count_expert") == {"permute"}
    assert ops("reduce_fused") == {"unpermute"}
    assert ops("per_token_cast_to_fp8_with_fp8_special_fmt") == {None}
    casts = ops("void cuda::per_token_cast_to_fp8_with_channels")  # not the fused SwiGLU+cast
    assert casts == {"q_a_quant", "kv_a_quant", "q_b_quant", "kv_b_quant", "o_proj_quant",
                     "ffn_quant", None}
    assert ops("m_grouped_fp8") == {"experts"} and ops("_copy_tensor_kernel") == {"kv_expand"}
    per_layer = [s for (layer, op), s in train.op_seconds().items() if op == "ffn_quant"]
    assert len(per_layer) == 4 and all(40e-6 < s < 70e-6 for s in per_layer)  # one 4096x7168 cast


def test_flash_attention_and_deepep_kernels_are_the_ops_they_implement(train):
    """Spot checks against the kernel names: FA3 forward is core attention, DeepEP's internode
    dispatch/combine are the collectives, and notify kernels have their own kind."""
    by_name = {}
    for m in train.kernels:
        by_name.setdefault(m.kernel.name.split("(")[0][:40], set()).add((m.op, m.role, m.kind))
    flash = [m for m in train.kernels if "flash::compute_attn_ws" in m.kernel.name]
    assert len(flash) == 4 and {(m.op, m.role) for m in flash} == {("core_attn", "core_attn")}
    notify = [m for m in train.kernels if "notify_dispatch" in m.kernel.name and m.op]
    assert notify and all(m.kind == "notify" and m.kernel.stream == 27 for m in notify)
    grouped = [m for m in train.kernels if "m_grouped_fp8" in m.kernel.name and m.op]
    assert len(grouped) == 8 and {m.op for m in grouped} == {"experts"}  # up + down per layer


def test_measurements_are_one_per_layer_and_op(train):
    """Each forward op of each of the 4 layers is one measurement: its kernels summed."""
    found = load_measurements(FIXTURE)
    counts = {}
    for m in found:
        counts[m.name] = counts.get(m.name, 0) + 1
    assert counts == dict.fromkeys(FORWARD_OPS, 4)
    per_op = train.op_seconds()
    assert sum(m.duration_s for m in found) == pytest.approx(sum(per_op.values()))
    kinds = {m.name: m.kind for m in found}
    assert kinds["dispatch"] == kinds["combine"] == "comm" and kinds["experts"] == "compute"


def test_groups_fold_fine_ops_into_the_graphs_coarse_ones():
    """``groups`` sums the fine MLA ops into the op of the graph being calibrated."""
    fine = load_measurements(FIXTURE)
    groups = {op: "attn" for op in ("input_norm", "q_a", "q_norm", "q_b", "q_rope", "kv_a",
                                    "kv_prep", "core_attn", "o_proj")}
    coarse = load_measurements(FIXTURE, groups=groups)
    attn = [m.duration_s for m in coarse if m.name == "attn"]
    assert len(attn) == 4
    assert sum(attn) == pytest.approx(sum(m.duration_s for m in fine if m.name in groups))


def test_the_measured_timeline_reports_overlap(train):
    """The trace as a Timeline: metrics read it like any other; DeepSeek's DualPipe chunk pair
    hides nearly all communication under compute (the issue quotes 96%)."""
    tl = kernel_timeline(train)
    assert tl.measured and len(tl.spans) == 963
    m = metrics(tl)
    hidden = 1 - m.exposed_comm_s / m.comm_busy_s
    assert 0.9 < hidden <= 1.0


def kernel(name, tid, ts, dur):
    return {"ph": "X", "cat": "kernel", "name": name, "pid": 0, "tid": tid, "ts": ts, "dur": dur}


def graph_replay(layers=3):
    """An un-annotated trace (as CUDA-graph replays give): a prologue kernel, then per layer a
    norm, two dense fp8 GEMMs around flash attention, and a DeepEP dispatch on stream 9."""
    events, ts = [kernel("prologue_kernel", 7, 0, 5)], 10
    for _ in range(layers):
        for name, dur in (("layer_norm::ln_fwd_kernel<>", 3), ("dpsk::grouped_gemm::cuda::fp8_ptp128c"
                                                                "::GemmKernel", 10),
                          ("void flash::compute_attn_ws<>", 20),
                          ("dpsk::grouped_gemm::cuda::fp8_ptp128c::GemmKernel", 11)):
            events.append(kernel(name, 7, ts, dur))
            ts += dur + 1
        events.append(kernel("void dpsk::ep::internode::dispatch<false>", 9, ts - 5, 30))
    return {"traceEvents": events}


def test_without_annotations_layers_come_from_the_periodic_pattern(tmp_path):
    """A CUDA-graph replay has no annotations: with the layer count, the compute stream is cut
    where its pattern repeats; the prologue before the first period is unmodelled."""
    path = tmp_path / "replay.json"
    path.write_text(json.dumps(graph_replay(3)))
    trace = read_kernel_trace(path)
    with pytest.raises(ConfigError, match=r"no user annotations to find layers by; pass the "
                                          r"number of layers it covers \(--layers N\)"):
        profile(trace)
    prof = profile(trace, layers=3)
    assert prof.layers == (0, 1, 2) and prof.comm_streams == (9,)
    assert [m.layer for m in prof.kernels][:6] == [None, 0, 0, 0, 0, 0]
    ops = [(m.layer, m.op) for m in prof.kernels if m.kernel.stream == 7 and m.layer == 1]
    assert ops == [(1, None), (1, "q_a"), (1, "core_attn"), (1, "kv_a")]  # no norm rule outside attn(F)
    with pytest.raises(ConfigError, match=r"cannot segment the trace into 4 layers"):
        profile(trace, layers=4)


def test_a_user_table_goes_in_front_of_the_shipped_one(tmp_path):
    """User rules override: here the replay's norm becomes ``input_norm``."""
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"name": "mine", "rules": [
        {"match": "ln_fwd", "op": "input_norm", "role": "norm"}]}))
    table = DEEPSEEK_H800.extended(load_kernel_table(path))
    replay = tmp_path / "replay.json"
    replay.write_text(json.dumps(graph_replay(2)))
    prof = profile(read_kernel_trace(replay), table, layers=2)
    assert [m.op for m in prof.kernels if "ln_fwd" in m.kernel.name] == ["input_norm", "input_norm"]
    assert isinstance(table, KernelTable) and table.name == "mine+deepseek-h800"


@pytest.mark.parametrize(("rules", "message"), [
    ({"rules": [{"match": "(", "op": "x"}]}, r"kernel rule '\(': bad regex"),
    ({"rules": [{"match": "a", "opp": "x"}]}, r"rule #0 has unknown key\(s\) \['opp'\]; valid: match, op"),
    ({"rules": [{"match": "a", "kind": "gpu"}]}, r"rule #0: 'kind' must be one of compute, comm, notify"),
    ({"rules": [{"match": "a", "nth": -1}]}, r"rule #0: 'nth' must be an integer >= 0 \(got -1\)"),
    ({"rules": "x"}, r"expected an object with a 'rules' list"),
])
def test_bad_kernel_tables_are_refused(rules, message):
    with pytest.raises(ConfigError, match=message):
        table_from_dict(rules)


# -- bad trace files (issue 11's trace cases) -------------------------------------------------------


def write(tmp_path, text, name="t.json"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(("event", "message"), [
    ('{"ph":"X","cat":"kernel","name":"k","ts":1,"dur":null}', r"'dur' must be a finite number \(got None\)"),
    ('{"ph":"X","cat":"kernel","name":"k","ts":1,"dur":NaN}', r"'dur' must be a finite number \(got nan\)"),
    ('{"ph":"X","cat":"kernel","name":"k","ts":1,"dur":-4}', r"'dur' must be >= 0 \(got -4\)"),
    ('{"ph":"X","cat":"kernel","name":"k","dur":4}', r"'ts' must be a finite number \(got None\)"),
    ('{"ph":"X","name":"attn","ts":1,"dur":null}', r"'dur' must be a finite number \(got None\)"),
    ('{"ph":"B","name":"attn","pid":0,"tid":0}', r"'ts' must be a finite number \(got None\)"),
    ('{"ph":"E","name":"attn","pid":0,"tid":0,"ts":"soon"}', r"'ts' must be a finite number \(got 'soon'\)"),
])
def test_bad_event_times_are_one_error_naming_the_event(tmp_path, event, message):
    path = write(tmp_path, f'{{"traceEvents":[{{"ph":"M"}},{event}]}}')
    with pytest.raises(ConfigError, match=rf"^'{re.escape(str(path))}' event #1 \('[a-z]+'\): {message}$"):
        load_measurements(path)


def test_deeply_nested_json_is_one_error(tmp_path):
    path = write(tmp_path, '{"traceEvents":[' + "[" * 100_000 + "]" * 100_000 + "]}")
    with pytest.raises(ConfigError, match=r"is nested too deeply to be a trace$"):
        load_measurements(path)


def test_truncated_and_corrupt_gzip_are_one_error(tmp_path):
    data = gzip.compress(json.dumps(graph_replay(2)).encode())
    with pytest.raises(ConfigError, match=r"is a truncated gzip file$"):
        load_measurements(write(tmp_path, data[: len(data) // 2], "cut.json.gz"))
    with pytest.raises(ConfigError, match=r"looks gzipped but cannot be decompressed"):
        load_measurements(write(tmp_path, data[:10] + b"\0" * 40, "bad.json.gz"))


def test_a_gzip_bomb_is_refused_before_it_inflates(tmp_path, monkeypatch):
    """300 KB that inflate to hundreds of MB: refused by the ratio cap with a clear message,
    without holding the inflated text (the window stays about one chunk)."""
    monkeypatch.setattr(trace_json, "RATIO_FREE", 1 << 20)
    bomb = gzip.compress(b'{"traceEvents":[' + b" " * (64 << 20) + b"]}", 9)
    path = write(tmp_path, bomb, "bomb.json.gz")
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match=r"inflates more than 200x .* refused as a "
                                              r"decompression bomb"):
            load_measurements(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20


def test_the_size_cap_names_the_limit(tmp_path):
    path = write(tmp_path, json.dumps(graph_replay(3)))
    with pytest.raises(ConfigError, match=r"is more than 0 MiB of trace text; the limit guards"):
        read_kernel_trace(path, max_bytes=100)


def test_a_large_trace_is_parsed_in_bounded_memory(tmp_path):
    """The reader keeps kernels only: a 40 MB trace of mostly CPU events peaks at a few MB."""
    cpu = json.dumps({"ph": "X", "cat": "cpu_op", "name": "aten::mm" + "x" * 300, "pid": 1,
                      "tid": 1, "ts": 1, "dur": 2, "args": {"Input Dims": [[4096, 7168]] * 8}})
    events = ",".join([cpu] * 100_000 + [json.dumps(kernel("void flash::compute_attn_ws<>", 7, 5, 9))])
    path = write(tmp_path, '{"traceEvents":[' + events + "]}")
    assert path.stat().st_size > 40e6
    tracemalloc.start()
    try:
        trace = read_kernel_trace(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(trace.kernels) == 1 and peak < 16 << 20


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=trace_files())
def test_fuzzed_trace_files_load_or_raise_one_overlap_error(tmp_path, data):
    """Whatever the bytes: a list of measurements, or one OverlapError (never another exception)."""
    path = write(tmp_path, data, "fuzz.json")
    try:
        found = load_measurements(path)
    except OverlapError:
        return
    assert isinstance(found, list) and all(m.duration_s >= 0 for m in found)


def test_calibrate_reads_the_public_trace_from_the_cli(capsys):
    """``overlap calibrate`` on the DeepSeek trace matches every graph op it measured (the issue:
    it used to exit with "no op names in common")."""
    from overlap.cli import main

    code = main(["calibrate", str(FIXTURE), "--hardware", "h800", "--ep", "64", "--tokens", "4096",
                 "--dtype", "fp8", "--strategy", "sequential", "--microbatches", "1"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    table = lines[1:next(i for i, line in enumerate(lines) if line.startswith("factors"))]
    assert {line.split()[0] for line in table} == {"attn", "gate", "ffn_quant", "dispatch",
                                                   "permute", "experts", "unpermute", "shared",
                                                   "combine"}
    assert "kernel trace (deepseek-h800): 963 kernels" in out
    assert "unmodelled kernel time (no op in the graph): backward 146.68 ms, fp8_cache" in out


def test_fidelity_benchmark_runs_offline_on_the_committed_excerpt(tmp_path):
    """benchmarks/fidelity.py on the fixture: per-role rows for every graph role it measured,
    and the replay goals of issue 10 that hold today (layer period within 10%, hidden comm
    within 5 points of the trace after calibration). Deterministic: no timing involved."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "fidelity.json"
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "fidelity.py"), "--json", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert {r["role"] for r in data["roles"]} == {"norm", "mla_matrix", "mla_vector", "attn1",
                                                  "gate", "dispatch", "experts", "combine", "shared",
                                                  "quant", "permute"}
    measured, calibrated = data["measured"], data["replays"]["calibrated"]
    assert abs(calibrated["period_s"] / measured["period_s"] - 1) <= 0.10
    assert abs(calibrated["hidden"] - measured["hidden"]) <= 0.05
