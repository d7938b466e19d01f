"""Bad inputs end as one documented error, never a traceback, a hang or a half-written file.

Every case the reliability issue listed is a regression test here. The CLI cases double as the
table in docs/errors.md (input -> the line a user sees); a test keeps that table current.
"""

from __future__ import annotations

import pytest

from overlap.cli import main
from overlap.errors import ConfigError, suggest
from overlap.report.scenario import strategy_names


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
