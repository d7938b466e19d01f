"""Decode with several query tokens per request (MTP / speculative decoding; issue 10)."""

from __future__ import annotations

import pytest

from overlap.cli import main
from overlap.errors import ConfigError
from overlap.search.scenario import Scenario


def test_query_len_gives_each_decode_request_k_tokens():
    """DeepSeek decodes 2 tokens per request: 128 requests are 256 tokens over the same context."""
    batch = Scenario(phase="decode", requests=128, context=4096, query_len=2).batch()
    assert len(batch) == 128 and batch.tokens == 256
    assert {(r.query_len, r.context_len) for r in batch.requests} == {(2, 4096)}
    assert Scenario(phase="decode", tokens=256, query_len=2).batch().tokens == 256


def test_query_len_is_checked_against_the_phase_and_the_token_count():
    with pytest.raises(ConfigError, match=r"^'query_len' applies to decode"):
        Scenario(query_len=2)
    with pytest.raises(ConfigError, match=r"2 token\(s\) per request: 'tokens' \(128\) must equal "
                                          r"'requests' \(128\) x 'query_len' \(2\)"):
        Scenario(phase="decode", tokens=128, requests=128, query_len=2)
    with pytest.raises(ConfigError, match=r"'query_len' must be >= 1 \(got 0\)"):
        Scenario(phase="decode", query_len=0)


def test_the_cli_takes_query_len(capsys, tmp_path):
    """``--query-len 2`` reaches the scenario: the description says so and the step is slower."""
    args = ["simulate", "--phase", "decode", "--hardware", "h800", "--ep", "64", "--requests", "64",
            "--strategy", "sequential", "--no-plot", "--out", str(tmp_path)]
    steps = []
    for k in (1, 2):
        assert main([*args, "--query-len", str(k)]) == 0
        out = capsys.readouterr().out
        steps.append(float(next(line.split()[1] for line in out.splitlines()
                                if line.startswith("sequential"))))
        assert ("2 query tokens each" in out) == (k == 2)
    assert steps[1] > steps[0]
