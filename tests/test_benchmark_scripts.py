"""Smoke runs of benchmark scripts that no other test exercises (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_device_overlap_compares_every_strategy_with_its_prediction(tmp_path):
    """benchmarks/device_overlap.py runs a tiny case and reports measured and predicted times."""
    pytest.importorskip("torch")
    out = tmp_path / "result.json"
    args = ["--tokens", "64", "--dim", "32", "--layers", "2", "--repeats", "1", "--json", str(out)]
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_overlap.py"), *args],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["strategy"] for r in rows] == ["sequential", "ascend_dbo", "vllm_dbo", "deepseek_prefill"]
    assert all(r["measured_ms"] > 0 and r["predicted_ms"] > 0 for r in rows)


def test_device_overlap_rejects_bad_sizes():
    """A non-positive size is one error line, exit status 2."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_overlap.py"),
                          "--tokens", "0"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode != 0 and "'--tokens' must be >= 1 (got 0)" in run.stderr
