"""Reports: metrics formulas on hand-written timelines, trace JSON, Gantt PNG, tables, scenarios."""

from __future__ import annotations

import json

import pytest

from overlap.backends.timeline import covered, uncovered
from overlap.cost import load_measurements
from overlap.errors import ConfigError
from overlap.report import (
    Span,
    Timeline,
    chrome_trace,
    efficiency,
    format_table,
    gantt,
    metrics,
    steady_window,
    write_trace,
)
from overlap.search.scenario import Scenario, best, compare, strategy_names

US = 1e-6


def span(op: str, start: float, end: float, kind: str = "compute", stream: int = 0, micro: int = 0,
         layer: int = 0) -> Span:
    return Span(layer, micro, op, stream, start * US, end * US, kind)


# compute 0-10 and 20-30 on stream 0; comm 5-25 on stream 1
TIMELINE = Timeline("hand", ["compute", "comm"], [
    span("attn", 0, 10), span("dispatch", 5, 25, "comm", 1), span("experts", 20, 30, micro=1)],
    device="test", bound_s=20 * US)


def test_exposed_comm_is_comm_time_with_no_compute_beside_it():
    """Comm 5-25 beside compute 0-10 and 20-30 is exposed only during 10-20."""
    assert metrics(TIMELINE).exposed_comm_s == pytest.approx(10 * US)


def test_utilisation_is_busy_time_over_step_time():
    """20 µs of compute and 20 µs of comm in a 30 µs step."""
    m = metrics(TIMELINE)
    assert (m.step_s, m.compute_util, m.comm_util) == (pytest.approx(30 * US), pytest.approx(2 / 3),
                                                       pytest.approx(2 / 3))


def test_speedup_and_efficiency_against_a_baseline():
    """Baseline 40 µs, plan 30 µs, bound 20 µs: speed-up 4/3, eta (40-30)/(40-20) = 0.5."""
    m = metrics(TIMELINE, 40 * US)
    assert (m.speedup, m.efficiency) == (pytest.approx(4 / 3), pytest.approx(0.5))


def test_efficiency_is_undefined_when_nothing_can_be_gained():
    """T_seq <= T_bound leaves no overlap to win: eta is None, not a division by zero."""
    assert efficiency(1.0, 1.0, 1.0) is None and efficiency(1.0, 0.9, 1.2) is None


def test_busy_time_merges_overlapping_intervals():
    """Overlapping and touching intervals count once."""
    assert covered([(0, 2), (1, 3), (3, 4), (6, 7)]) == 5


def test_uncovered_subtracts_every_covering_interval():
    """[0, 10] minus [1, 2] and [5, 7] leaves 7."""
    assert uncovered([(0, 10)], [(5, 7), (1, 2), (20, 30)]) == 7


def test_trace_has_one_track_per_stream_and_complete_events_in_us():
    """Thread names are the streams; spans are ph X events in µs with layer/micro/op args."""
    events = chrome_trace(TIMELINE)["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    spans = [e for e in events if e["ph"] == "X"]
    assert names == {0: "compute", 1: "comm"}
    assert spans[1] == {"ph": "X", "pid": 0, "tid": 1, "name": "dispatch", "cat": "comm", "ts": 5.0,
                        "dur": 20.0, "args": {"layer": 0, "micro": 0, "op": "dispatch"}}


def test_several_timelines_go_to_separate_processes():
    """Two timelines in one trace get pids 0 and 1."""
    events = chrome_trace([TIMELINE, TIMELINE])["traceEvents"]
    assert {e["pid"] for e in events if e["ph"] == "X"} == {0, 1}


def test_written_trace_reads_back_as_measurements(tmp_path):
    """The calibration loader reads our trace: op names and durations survive."""
    path = write_trace(TIMELINE, tmp_path / "sub" / "t.json")
    found = [(m.name, round(m.duration_s / US, 6)) for m in load_measurements(path)]
    assert json.loads(path.read_text())["displayTimeUnit"] == "ms"
    assert found == [("attn", 10), ("dispatch", 20), ("experts", 10)]


def test_steady_window_covers_middle_layers():
    """Of layers 0-5, a two-layer window starts at layer 3's first span and ends at layer 4's last."""
    tl = Timeline("t", ["c"], [span("a", 10 * i, 10 * i + 8, layer=i) for i in range(6)])
    assert steady_window(tl, layers=2) == (30 * US, 48 * US)


def test_gantt_writes_a_png(tmp_path):
    """The picture is a PNG file."""
    pytest.importorskip("matplotlib")
    path = gantt(TIMELINE, tmp_path / "g.png", window=(0, 30 * US))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gantt_refuses_an_empty_window(tmp_path):
    """A window that ends before it starts is a ConfigError."""
    pytest.importorskip("matplotlib")
    with pytest.raises(ConfigError, match="the window must end after it starts"):
        gantt(TIMELINE, tmp_path / "g.png", window=(1.0, 1.0))


def test_table_aligns_numbers_right_and_text_left():
    """Numeric columns are right-aligned; a missing figure prints as '-'."""
    assert format_table(["name", "ms"], [["a", 1.5], ["long", None]]).splitlines() == [
        "name     ms", "----  -----", "a     1.500", "long      -"]


def test_strategy_names_expand_all_and_reject_unknown_names():
    """'all' is every registered strategy; a typo lists the valid names."""
    assert "sequential" in strategy_names("all")
    with pytest.raises(ConfigError, match="unknown strategy 'nope'; valid: all, sequential"):
        strategy_names("sequential,nope")


def test_compare_reports_a_strategy_that_cannot_run_instead_of_failing():
    """With three microbatches the two-microbatch DeepSeek schedules report why they did not run."""
    results = compare(Scenario(num_layers=4, microbatches=3, tokens=4096),
                      "sequential,deepseek_prefill,sglang_tbo")
    assert [r.error is None for r in results] == [True, False, True]
    assert "needs 2 microbatches (got 3)" in results[1].error
    assert best(results).strategy == "sglang_tbo"


def test_decode_scenario_uses_requests_and_context():
    """A decode scenario is one-token requests after the given context."""
    batch = Scenario(phase="decode", requests=8, context=100).batch()
    assert (len(batch), batch.tokens, batch.requests[0].context_len) == (8, 8, 100)


def test_decode_tokens_must_match_requests():
    """In decode, tokens and requests name the same number."""
    with pytest.raises(ConfigError, match=r"'tokens' \(8\) must equal 'requests' \(4\)"):
        Scenario(phase="decode", tokens=8, requests=4)


def test_side_by_side_gives_each_stream_a_measured_and_a_simulated_lane(tmp_path):
    """Two lanes per stream, measured above simulated, compute streams first; the spans keep
    their times. The picture of it is a PNG."""
    from overlap.report import gantt_pair, side_by_side

    simulated = Timeline("hand", ["compute", "comm"],
                         [span("attn", 0, 8), span("dispatch", 8, 20, "comm", 1)])
    both = side_by_side(TIMELINE, simulated)
    assert both.streams == ("compute (measured)", "compute (simulated)", "comm (measured)",
                            "comm (simulated)")
    assert [(s.op, s.stream) for s in both.spans] == [("attn", 0), ("dispatch", 2), ("experts", 0),
                                                      ("attn", 1), ("dispatch", 3)]
    assert [s.start for s in both.spans] == [s.start for s in (*TIMELINE.spans, *simulated.spans)]
    with pytest.raises(ConfigError, match=r"side by side needs the same streams \(got 2 and 1\)"):
        side_by_side(TIMELINE, Timeline("x", ["compute"], []))
    pytest.importorskip("matplotlib")
    path = gantt_pair(TIMELINE, simulated, tmp_path / "pair.png", window=(0, 30 * US))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
