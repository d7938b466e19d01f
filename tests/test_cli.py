"""The command line: entry points, help, and one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from overlap.cli import main


def test_import_overlap_does_not_import_torch():
    """`import overlap` stays free of torch (checked in a fresh interpreter)."""
    code = "import overlap, overlap.ops_graph.templates, overlap.cli, sys; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_python_dash_m_is_the_console_script():
    """`python -m overlap --help` prints the same parser as `overlap`."""
    out = subprocess.run([sys.executable, "-m", "overlap", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("usage: overlap")


def test_graph_command_prints_layers_and_writes_json(tmp_path, capsys):
    """`overlap graph` prints the distinct layer graphs and their JSON."""
    path = tmp_path / "g.json"
    assert main(["graph", "--ep", "16", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "model deepseek-v3 (61 layers; 0-2: deepseek-v3.dense, 3-60: deepseek-v3.moe)" in out
    assert re.search(r"\bdispatch +comm all_to_all@ep\[16\]", out)  # columns fit the names
    assert json.loads(path.read_text())["layers"][3] == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["graph", "--model", "nope"], "overlap: error: unknown model 'nope'"),
    (["graph", "--tp", "3", "--ep", "1"], "num_heads (128) must be divisible"),
    (["graph", "--tokens", "0"], "'--tokens' must be >= 1 (got 0)"),
])
def test_bad_arguments_give_one_line(argv, message, capsys):
    """User errors exit 2 with a single line on stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_default_simulate_prints_every_strategy_and_writes_the_best(tmp_path):
    """`overlap` alone tables every registered strategy and writes a Gantt PNG and a trace."""
    pytest.importorskip("matplotlib")
    from overlap.plan import STRATEGIES

    out = subprocess.run([sys.executable, "-m", "overlap"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    assert set(STRATEGIES) <= rows
    assert "deepseek-v3 on 910b2: prefill of 16384 tokens per rank (4 requests), TP1 EP16" in out.stdout
    written = sorted(p.suffix for p in (tmp_path / "overlap-out").iterdir())
    assert written == [".json", ".png"] and "wrote overlap-out/" in out.stdout


def test_simulate_path_stays_free_of_torch_and_matplotlib(tmp_path):
    """Simulating without a picture imports neither torch nor matplotlib."""
    code = ("import sys; from overlap.cli import main; "
            f"main(['simulate', '--no-plot', '--out', {str(tmp_path)!r}]); "
            "sys.exit(bool({'torch', 'matplotlib'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode == 0


def test_simulate_json_holds_every_printed_figure(tmp_path, capsys):
    """--json has a result per strategy with step time, speed-up and eta, and the files written."""
    path = tmp_path / "r.json"
    argv = ["simulate", "--strategy", "sequential,sglang_tbo", "--tokens", "4096", "--no-plot",
            "--out", str(tmp_path), "--json", str(path)]
    assert main(argv) == 0
    data = json.loads(path.read_text())
    out = capsys.readouterr().out
    assert [r["strategy"] for r in data["results"]] == ["sequential", "sglang_tbo"]
    tbo = data["results"][1]
    assert f"{tbo['step_s'] * 1e3:.3f}" in out and f"{tbo['speedup']:.3f}x" in out
    assert data["best"] == "sglang_tbo" and data["files"]["trace"].endswith("sglang_tbo.trace.json")


def test_compare_runs_the_scenario_matrix(capsys):
    """Two token counts x two EP sizes x two strategies give eight rows."""
    argv = ["compare", "--tokens", "2048,4096", "--ep", "8,16", "--strategy", "sequential,vllm_dbo"]
    assert main(argv) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r.split()[:3] for r in rows] == [
        [t, e, s] for t in ("2048", "4096") for e in ("8", "16") for s in ("sequential", "vllm_dbo")]


def test_plan_json_is_a_plan(capsys):
    """`overlap plan --format json` prints JSON that loads back as the strategy's Plan."""
    from overlap.plan import Plan

    assert main(["plan", "--strategy", "ascend_dbo", "--tokens", "1024", "--format", "json"]) == 0
    assert Plan.from_json(capsys.readouterr().out).strategy == "ascend_dbo"


def test_plan_text_shows_the_stream_lanes(capsys):
    """`overlap plan` prints the plan's header and lanes."""
    assert main(["plan", "--strategy", "sglang_tbo", "--tokens", "1024"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan sglang_tbo: 2 microbatches") and "steady state" in out


def test_calibrating_against_its_own_trace_changes_nothing(tmp_path, capsys):
    """The sequential plan's own simulated trace as measurements fits every factor to 1."""
    trace = tmp_path / "t.json"
    assert main(["trace", "--strategy", "sequential", "--tokens", "2048", "-o", str(trace)]) == 0
    assert main(["calibrate", str(trace), "--tokens", "2048"]) == 0
    assert "factors (median): compute x1.000, comm x1.000, host x1.000" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["simulate", "--strategy", "nope"], "unknown strategy 'nope'; valid: all, sequential"),
    (["simulate", "--hardware", "tpu"], "unknown hardware 'tpu'"),
    (["simulate", "--tokens", "0"], "'tokens' must be >= 1 (got 0)"),
    (["simulate", "--comm-share", "2"], "'comm_compute_share' must be in [0, 1] (got 2.0)"),
    (["simulate", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["compare", "--ep", "8,x"], "expected integers separated by commas (got '8,x')"),
    (["plan", "--strategy", "all"], "'--strategy' must name one strategy here"),
    (["calibrate", "/no/such/file.csv"], "cannot read measurements from '/no/such/file.csv'"),
    (["trace", "--phase", "decode", "--tokens", "8", "--requests", "4"], "'tokens' (8) must equal"),
])
def test_bad_scenario_arguments_give_one_line(argv, message, capsys):
    """Each mistake exits 2 with one line on stderr naming it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_moe_comm_flag_selects_the_all_gather_moe(capsys):
    """--moe-comm all_gather plans the all-gather / reduce-scatter MoE of a TP deployment."""
    assert main(["graph", "--tp", "4", "--ep", "1", "--moe-comm", "all_gather"]) == 0
    out = capsys.readouterr().out
    assert "ffn_gather   comm all_gather@tp[4]" in out and "reduce_scatter@tp[4]" in out
    assert main(["simulate", "--moe-comm", "all_gather", "--no-plot", "--strategy", "sequential"]) == 2
    err = capsys.readouterr().err
    assert "'moe_comm' all_gather is tensor-parallel MoE and needs ep=1 (got ep=16)" in err
