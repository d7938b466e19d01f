"""The command line: entry points, help, and one-line errors."""

from __future__ import annotations

import json
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
    assert "dispatch  comm all_to_all@ep[16]" in out
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
