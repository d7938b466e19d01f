"""Calibration: reading traces and CSVs, fitting per-kind factors, applying them to hardware."""

from __future__ import annotations

import gzip
import json
import re
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlap.cost import HARDWARE, Measurement, collective_time, fit, load_measurements, op_time
from overlap.errors import ConfigError
from overlap.ops_graph import OpKind
from overlap.ops_graph.cost import CostFigures

HW = HARDWARE["h800"]
COMPUTE_OPS = {
    "attn": CostFigures(flops=4e12, vector_flops=2e10, hbm_bytes=2e9),
    "mlp": CostFigures(flops=8e12, hbm_bytes=6e9, dtype="fp8"),
    "shared": CostFigures(flops=1e12, hbm_bytes=1e10),
}
COMM_OPS = {"dispatch": 2e8, "combine": 4e8}


def _predicted(hw):
    predicted = {name: ("compute", op_time(fig, hw).total_s) for name, fig in COMPUTE_OPS.items()}
    for name, size in COMM_OPS.items():
        predicted[name] = ("comm", collective_time("all_to_all", size, 16, hw))
    return predicted


def _write_trace(path, durations_s, repeats=3):
    """A Chrome trace with each op as an X event per layer, plus one B/E pair and noise."""
    events, ts = [{"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "rank0"}}], 0.0
    for _ in range(repeats):
        for name, seconds in durations_s.items():
            events.append(
                {"ph": "X", "name": name, "cat": "kernel", "pid": 0, "tid": 7, "ts": ts, "dur": seconds * 1e6}
            )
            ts += seconds * 1e6 + 1
    events += [
        {"ph": "B", "name": "host_sync", "pid": 0, "tid": 1, "ts": 10.0},
        {"ph": "E", "pid": 0, "tid": 1, "ts": 35.0},
        {"ph": "i", "name": "marker", "pid": 0, "tid": 1, "ts": 40.0},
    ]
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return path


def test_round_trip_recovers_known_factors(tmp_path):
    """Ops measured 1.3x (compute) and 1.5x (comm) slower give those factors, and the calibrated
    hardware then predicts the measured times."""
    predicted = _predicted(HW)
    truth = {"compute": 1.3, "comm": 1.5}
    measured = {name: seconds * truth[kind] for name, (kind, seconds) in predicted.items()}
    trace = _write_trace(tmp_path / "trace.json", measured)

    calibration = fit(predicted, load_measurements(trace))
    assert calibration.compute == pytest.approx(1.3)
    assert calibration.comm == pytest.approx(1.5)
    assert calibration.host == 1.0
    assert calibration.error_before > 0.2
    assert calibration.error_after == pytest.approx(0.0, abs=1e-9)

    calibrated = _predicted(calibration.apply(HW))
    for name, (_, seconds) in calibrated.items():
        assert seconds == pytest.approx(measured[name], rel=1e-9), name


def test_lstsq_method_weights_long_ops(tmp_path):
    """Least squares through the origin gives sum(m*p)/sum(p*p) per kind."""
    predicted = {"a": ("compute", 1.0), "b": ("compute", 3.0)}
    measured = [Measurement("a", 2.0), Measurement("b", 3.0)]
    assert fit(predicted, measured, method="lstsq").compute == pytest.approx((2 + 9) / (1 + 9))
    assert fit(predicted, measured, method="median").compute == pytest.approx((2 + 1) / 2)


def test_repeated_ops_use_the_median_duration():
    """An op seen once per layer is summarised by its median, so one outlier does not skew it."""
    measured = [Measurement("a", d) for d in (1.0, 1.1, 9.0)]
    row = fit({"a": (OpKind.COMPUTE, 1.0)}, measured).rows[0]
    assert (row.measured_s, row.samples) == (1.1, 3)


def test_report_lists_each_op_and_the_factors(tmp_path):
    """The report shows predicted vs measured per op and the error before and after."""
    predicted = {"attn": ("compute", 1e-3), "a2a": ("comm", 2e-3), "unseen": ("host", 1e-4)}
    measured = [Measurement("attn", 2e-3), Measurement("a2a", 2e-3)]
    report = fit(predicted, measured).report()
    assert "attn" in report and "a2a" in report
    assert "compute x2.000, comm x1.000, host x1.000" in report
    assert "not measured: unseen" in report


def test_bare_event_list_and_gzip_are_read(tmp_path):
    """A trace may be a bare JSON list, and may be gzipped as PyTorch's exporter writes it."""
    events = [{"ph": "X", "name": "mlp", "ts": 0, "dur": 250, "args": {"kind": "compute"}}]
    path = tmp_path / "rank0.pt.trace.json.gz"
    path.write_bytes(gzip.compress(json.dumps(events).encode()))
    assert load_measurements(path) == [Measurement("mlp", 250e-6, "compute")]


def test_begin_end_pairs_become_durations(tmp_path):
    """B/E pairs on the same thread nest like a stack and give E.ts - B.ts."""
    events = [
        {"ph": "B", "name": "outer", "pid": 1, "tid": 1, "ts": 0},
        {"ph": "B", "name": "inner", "pid": 1, "tid": 1, "ts": 10},
        {"ph": "E", "pid": 1, "tid": 1, "ts": 30},
        {"ph": "E", "pid": 1, "tid": 1, "ts": 100},
    ]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert load_measurements(path) == [Measurement("inner", 20e-6), Measurement("outer", 100e-6)]


def test_csv_with_optional_kind(tmp_path):
    """A CSV with op,duration_us[,kind] is read in microseconds."""
    path = tmp_path / "m.csv"
    path.write_text("op,duration_us,kind\nattn,120.5,compute\ndispatch,300,\n")
    assert load_measurements(path) == [
        Measurement("attn", 120.5e-6, "compute"),
        Measurement("dispatch", 300e-6),
    ]


def test_missing_file_is_reported(tmp_path):
    """A path that does not exist says so."""
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=f"^cannot read measurements from '{re.escape(str(path))}': "):
        load_measurements(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.json", "{not json", "is not valid JSON: Expecting property name enclosed in"),
        ("obj.json", '{"events": []}', "is JSON but not a Chrome trace: expected an object with"),
        ("empty.json", '{"traceEvents": [{"ph": "M"}]}', "no complete events (ph 'X', or 'B'/'E' pairs) in"),
        ("cols.csv", "name,ms\na,1\n", "CSV must have columns op,duration_us[,kind] (got: name, ms)"),
        ("num.csv", "op,duration_us\na,fast\n", "line 2: 'duration_us' must be a number (got 'fast')"),
        ("neg.csv", "op,duration_us\na,-3\n", "line 2: 'duration_us' must be >= 0 (got -3)"),
        ("notes.txt", "hello", "unknown measurement format in"),
    ],
)
def test_bad_files_are_reported(tmp_path, name, content, message):
    """Each kind of unreadable input gives an error that names the file and the problem."""
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_measurements(path)


def test_no_common_names_lists_both_sides():
    """When nothing overlaps, the error shows what was predicted and what was measured."""
    message = (
        "no op names in common between predicted (2: attn, mlp) "
        "and measured (3: aten::mm, nccl:all_to_all, void gemm<...>)"
    )
    measured = [Measurement(n, 1.0) for n in ("aten::mm", "nccl:all_to_all", "void gemm<...>")]
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        fit({"attn": ("compute", 1.0), "mlp": ("compute", 1.0)}, measured)


def test_unknown_method_and_kind_are_rejected():
    """fit() names the valid methods and op kinds."""
    measured = [Measurement("a", 1.0)]
    with pytest.raises(ConfigError, match=r"^unknown method 'mean'; valid: median, lstsq$"):
        fit({"a": ("compute", 1.0)}, measured, method="mean")
    with pytest.raises(ConfigError, match=r"^unknown op kind 'gpu'; valid: compute, comm, host$"):
        fit({"a": ("gpu", 1.0)}, measured)


def test_apply_refuses_an_efficiency_above_one():
    """Ops measured far faster than the peak allows point at wrong figures, not at efficiency."""
    calibration = fit({"a": ("compute", 1.0)}, [Measurement("a", 0.1)])
    # h800's matrix_efficiency 0.68 (fitted to DeepGEMM's published table) / factor 0.1 = 6.8
    with pytest.raises(ConfigError, match=r"^calibrated 'matrix_efficiency' would be 6.8 > 1"):
        calibration.apply(HW)


def test_a_comm_factor_below_one_corrects_the_bytes_model():
    """Collectives measured at half the predicted time would need link efficiencies of 1.6 and
    1.8 on h800: the factor goes into ``comm_bytes_factor`` (and the latencies) instead, so every
    collective's predicted time halves exactly, and nothing is refused."""
    calibration = fit({"combine": ("comm", 2.0)}, [Measurement("combine", 1.0)])
    assert calibration.comm == 0.5
    hw = calibration.apply(HW)
    assert (hw.comm_bytes_factor, hw.inter_link_efficiency) == (0.5, HW.inter_link_efficiency)
    for size, ep in ((2e8, 16), (4e8, 64), (1e6, 8)):
        assert collective_time("all_to_all", size, ep, hw) == pytest.approx(
            0.5 * collective_time("all_to_all", size, ep, HW))


def test_fit_roles_gives_one_factor_per_role():
    """Per role: measured over predicted summed over its ops (each op's median)."""
    predicted = {"q_a": ("compute", 1.0), "q_b": ("compute", 3.0), "norm": ("compute", 1.0),
                 "combine": ("comm", 2.0)}
    measured = [Measurement("q_a", 2.0), Measurement("q_a", 4.0), Measurement("q_b", 5.0),
                Measurement("norm", 5.0), Measurement("combine", 1.0)]
    roles = {"q_a": "mla_matrix", "q_b": "mla_matrix"}
    from overlap.cost import fit_roles

    assert fit_roles(predicted, measured, roles) == {"mla_matrix": 2.0, "norm": 5.0, "combine": 0.5}
    with pytest.raises(ConfigError, match=r"^no op names in common"):
        fit_roles({"x": ("compute", 1.0)}, measured)


@given(layers=st.lists(st.tuples(st.floats(1e-4, 1.0), st.floats(1e-4, 1.0)), min_size=2,
                       max_size=8),
       predicted=st.tuples(st.floats(1e-4, 1.0), st.floats(1e-4, 1.0)))
def test_held_out_error_of_a_role_factor_is_the_measured_floor(layers, predicted):
    """With the same prediction for every layer, a role's factor fitted on one set of layers
    predicts another set exactly as well as the first set's measurement does: the held-out
    ratio is (fit-layer measurement) / (test-layer measurement), whatever the prediction
    (benchmarks/fidelity.py prints this floor)."""
    from overlap.cost import fit_roles

    half = len(layers) // 2
    fit_on, test_on = layers[:half], layers[half:]
    ops, roles = ("a", "b"), {"a": "r", "b": "r"}
    pred = {op: ("compute", p) for op, p in zip(ops, predicted)}
    measured = [Measurement(op, d) for layer in fit_on for op, d in zip(ops, layer)]
    factor = fit_roles(pred, measured, roles)["r"]

    def role_seconds(on):
        return sum(statistics.median(layer[i] for layer in on) for i in range(2))

    after = sum(predicted) * factor / role_seconds(test_on)
    assert after == pytest.approx(role_seconds(fit_on) / role_seconds(test_on), rel=1e-9)


def test_trace_excerpt_tool_regenerates_the_committed_excerpt(tmp_path):
    """tools/trace_excerpt.py keeps exactly what the excerpt holds: run on the committed excerpt
    it writes the same bytes (deterministic gzip), so the file can be regenerated from
    profile-data's train.json by anyone."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    fixture = root / "tests" / "data" / "deepseek-train-kernels.json.gz"
    out = tmp_path / "again.json.gz"
    source = "excerpt of train.json from https://github.com/deepseek-ai/profile-data (commit 4496024)"
    run = subprocess.run([sys.executable, str(root / "tools" / "trace_excerpt.py"), str(fixture),
                          str(out), "--source", source], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert out.read_bytes() == fixture.read_bytes()


def test_trace_excerpt_tool_refuses_a_trace_without_kernels(tmp_path):
    """An input with no device kernels is one error line and exit status 2, no output."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    bad = tmp_path / "cpu.json"
    bad.write_text(json.dumps({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::mm",
                                                "ts": 0, "dur": 1}]}))
    run = subprocess.run([sys.executable, str(root / "tools" / "trace_excerpt.py"), str(bad),
                          str(tmp_path / "out.json.gz"), "--source", "x"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr == ("trace_excerpt: error: the trace has no device kernels (events with cat "
                          "'kernel')\n")
    assert not (tmp_path / "out.json.gz").exists()
