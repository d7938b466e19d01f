"""Bad inputs end as one documented error, never a traceback, a hang or a half-written file.

Every case the reliability issue listed is a regression test here. The CLI cases double as the
table in docs/errors.md (input -> the line a user sees); a test keeps that table current.
"""

from __future__ import annotations

import pytest

from overlap.cli import main
from overlap.errors import ConfigError, suggest
from overlap.search.scenario import strategy_names


def test_suggest_names_the_close_valid_name():
    """A one-letter typo gets the intended name; an unrelated word gets nothing."""
    assert suggest("deepseek_prefil", ["sequential", "deepseek_prefill"]) == (
        " (did you mean 'deepseek_prefill'?)")
    assert suggest("H100", ["h100", "h800"]) == " (did you mean 'h100'?)"
    assert suggest("banana", ["sequential", "deepseek_prefill"]) == ""
    assert suggest(None, ["sequential"]) == ""


def test_all_inside_a_strategy_list_means_every_strategy_once():
    """'all,sequential' is every strategy, sequential not repeated."""
    names = strategy_names("all,sequential")
    assert names == strategy_names("all") and names.count("sequential") == 1


def test_empty_strategy_list_is_rejected():
    """'--strategy ,' names nothing."""
    with pytest.raises(ConfigError, match=r"^'--strategy' names no strategy \(got ','\)"):
        strategy_names(",")


def test_strategy_typo_suggests_the_name(capsys):
    """`--strategy deepseek_prefil` is one line that suggests deepseek_prefill."""
    assert main(["plan", "--strategy", "deepseek_prefil"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("overlap: error: unknown strategy 'deepseek_prefil' (did you mean "
                          "'deepseek_prefill'?); valid: all, sequential,")
    assert err.count("\n") == 1


# -- outputs are written atomically --------------------------------------------------------------


def _timeline():
    from overlap.search.scenario import Scenario, run

    return run(Scenario(tokens=256, num_layers=2), "sequential")


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    """A writer that fails halfway leaves the old content and no stray temporary file."""
    from overlap._atomic import atomic_path

    target = tmp_path / "out.json"
    target.write_text("good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.parametrize("writer", ["trace", "gantt", "json"])
def test_every_output_is_replaced_only_when_complete(tmp_path, monkeypatch, writer):
    """Trace, Gantt PNG and --json: when the final rename fails, the old file stays and the error
    names the file."""
    import os

    from overlap._atomic import write_json
    from overlap.errors import OutputError
    from overlap.report.trace import write_trace

    timeline = _timeline()
    target = tmp_path / "out"
    target.write_bytes(b"previous")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OutputError, match=rf"^cannot write '{target}': No space left on device$"):
        if writer == "trace":
            write_trace(timeline, target)
        elif writer == "gantt":
            pytest.importorskip("matplotlib")
            from overlap.report.gantt import gantt

            gantt(timeline, target)
        else:
            write_json(target, {"a": 1})
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_write_under_a_file_names_the_file(tmp_path, capsys):
    """`-o FILE/x.json` where FILE is a file: one line naming both."""
    (tmp_path / "f").write_text("")
    target = tmp_path / "f" / "t.json"
    assert main(["trace", "--strategy", "sequential", "--tokens", "256", "-o", str(target)]) == 2
    assert capsys.readouterr().err == (f"overlap: error: cannot write {str(target)!r}: "
                                       f"{str(tmp_path / 'f')!r} is not a folder\n")


def test_json_equal_to_trace_output_is_refused(tmp_path, capsys):
    """`trace -o X --json X` would overwrite the trace with the figures: refused up front."""
    target = tmp_path / "t.json"
    argv = ["trace", "--strategy", "sequential", "--tokens", "256", "-o", str(target),
            "--json", str(target)]
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"overlap: error: '--json' and '-o' both name "
                                       f"{str(target)!r}: give --json another path\n")
    assert not target.exists()
