"""Real processes for real collectives: start one rank per command line, wait for all of them
with a hard timeout, and kill every rank if any hangs, so a collective hang fails the test
instead of stalling the suite."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A localhost TCP port nobody is listening on (for the ranks' rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(argvs: list[list[str]], timeout_s: float) -> list[str]:
    """Run ``python *argv`` once per rank with this checkout importable and one OpenMP thread;
    return each rank's output. Fails the test if a rank exits non-zero or any runs past
    ``timeout_s`` (then all are killed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, *map(str, argv)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for argv in argvs]
    try:
        logs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"ranks did not finish within {timeout_s} s (a collective hang?)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r]}"
    return logs
