"""Smoke runs of the search benchmarks (benchmarks/strategies.py, benchmarks/decide.py); no
timing is asserted, only that they run and report what they promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_strategy_matrix_checks_the_goals(tmp_path):
    """The quick matrix prints the goals and records auto, decide and every named strategy."""
    out = tmp_path / "m.json"
    run = _run("strategies.py", "--quick", "--no-plot", "--json", str(out))
    assert run.returncode == 0, run.stderr
    assert "Goals: auto slower than sequential in 0" in run.stdout
    assert "Where auto beats the best named strategy by >= 5%, and why:" in run.stdout
    rows = json.loads(out.read_text())["scenarios"]
    assert {"auto", "decide", "single_batch", "chunked_experts", "off"} <= set(rows[0]["strategies"])


def test_decide_benchmark_reports_cold_and_cached_times(tmp_path):
    """The quick decide benchmark writes a row per case with both timings."""
    out = tmp_path / "d.json"
    run = _run("decide.py", "--quick", "--repeats", "1", "--json", str(out))
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["cold_ms"] > 0 and r["cached_shape_us"] > 0 for r in rows)


def test_decide_benchmark_rejects_no_repeats():
    """``--repeats 0`` is one error line and exit status 2."""
    run = _run("decide.py", "--repeats", "0")
    assert run.returncode == 2 and "'--repeats' must be >= 1 (got 0)" in run.stderr
