"""Bad inputs end as one documented error, never a traceback, a hang or a half-written file.

Every case the reliability issue listed is a regression test here. The CLI cases double as the
table in docs/errors.md (input -> the line a user sees); a test keeps that table current.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlap.cli import main
from overlap.errors import ConfigError, OverlapError, suggest
from overlap.search.scenario import strategy_names
from tests.strategies import csv_texts, json_values, mutated
from tests.timeouts import deadline

ROOT = Path(__file__).resolve().parent.parent


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


# -- the API raises the documented errors ---------------------------------------------------------


def _plan_dict():
    from overlap.search.scenario import Scenario, plan_for

    return plan_for(Scenario(tokens=256, num_layers=4), "deepseek_prefill").to_dict()


@pytest.mark.parametrize(("text", "message"), [
    ("[]", "not a plan: expected a JSON object (got list)"),
    ("{", "plan JSON is not valid JSON: "),
    ("[" * 100_000 + "]" * 100_000, "plan JSON is nested too deeply to read"),
    ('{"schema": "overlap.plan/1"}', "plan JSON is missing the field 'batch'"),
])
def test_plan_from_json_rejects_non_plans(text, message):
    """Plan.from_json on JSON that is not a plan raises PlanError, never a raw exception."""
    from overlap.errors import PlanError
    from overlap.plan import Plan

    with pytest.raises(PlanError, match=re.escape(message)):
        Plan.from_json(text)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["steps"][0].__setitem__(0, "0"),
     "plan field 'steps' must be a list of [int, int, str, int] rows"),
    (lambda d: d["model"]["layers"].__setitem__(2, 7),
     "model 'deepseek-v3': layer 2 names graph 7; valid: 0..1 (an index into 'graphs')"),
    (lambda d: d["model"]["layers"].__setitem__(0, -1),
     "model 'deepseek-v3': layer 0 names graph -1; valid: 0..1"),
    (lambda d: d["model"]["layers"].__setitem__(0, True),
     "model 'deepseek-v3': layer 0 names graph True"),
    (lambda d: d["micro"].__setitem__(0, [0, 200]),
     "microbatch 1 covers tokens 128..256 but must start at 200"),
    (lambda d: d["micro"].__setitem__(1, [128, 200]),
     "the microbatches cover tokens 0..200 of a batch of 256: they must cover all of it"),
    (lambda d: d["micro"].__setitem__(1, [128, 100]),
     "microbatch 1 covers tokens 128..100 but must start at 128 and hold at least one token"),
    (lambda d: d["batch"].clear(), "the batch is empty"),
    (lambda d: d.__setitem__("micro", []), "a split needs at least one microbatch"),
    (lambda d: d["streams"][0].__setitem__("kind", "gpu"), "a plan stream must be {name: a string"),
])
def test_plan_from_dict_rejects_bad_fields(edit, message):
    """A string layer number, a layer index past the end or negative, microbatches that do not
    partition the batch, an empty batch: each one PlanError or GraphError naming it."""
    from overlap.errors import OverlapError
    from overlap.plan import Plan

    data = _plan_dict()
    edit(data)
    with pytest.raises(OverlapError, match=re.escape(message)):
        Plan.from_dict(data)


def test_saved_plan_round_trips():
    """The loader's checks accept what to_dict writes."""
    from overlap.plan import Plan, validate

    data = _plan_dict()
    assert validate(Plan.from_dict(data)).to_dict() == data


def test_thousand_op_cycle_is_a_graph_error():
    """A cycle through 1000 ops is reported (naming the ops), not a RecursionError."""
    from overlap.errors import GraphError
    from overlap.ops_graph import Graph, Op, OpKind

    n = 1000
    ops = [Op(f"op{i}", OpKind.COMPUTE, (f"v{(i - 1) % n}",), (f"v{i}",)) for i in range(n)]
    ops.append(Op("head", OpKind.COMPUTE, ("x",), ("y",)))
    with pytest.raises(GraphError, match=r"^graph 'ring': cycle op\d+ -> op\d+ -> "):
        Graph("ring", ops, ["x"], ["y"])


# -- impossible models and deployments ------------------------------------------------------------


def _hf(**changes):
    from overlap.ops_graph.templates import PRESETS

    return {**PRESETS["deepseek-v3"], **changes}


@pytest.mark.parametrize(("changes", "message"), [
    ({"first_k_dense_replace": -5}, "'first_k_dense_replace' must be >= 0 (got -5)"),
    ({"first_k_dense_replace": 62}, "'first_k_dense_replace' (62) must be in 0..num_hidden_layers (61)"),
    ({"hidden_size": None}, "'hidden_size' must be an integer (got None)"),
    ({"hidden_size": -7168}, "'hidden_size' must be >= 1 (got -7168)"),
    ({"hidden_size": True}, "'hidden_size' must be an integer (got True)"),
    ({"hidden_size": 7168.5}, "'hidden_size' must be an integer (got 7168.5)"),
    ({"hidden_size": "7168"}, "'hidden_size' must be an integer (got '7168')"),
    ({"num_hidden_layers": 10**12}, "'num_layers' must be <= 1048576 (got 1000000000000)"),
    ({"q_lora_rank": 0}, "'q_lora_rank' must be >= 1 (got 0)"),
])
def test_impossible_model_configs_are_rejected(changes, message):
    """Negative, boolean, fractional, null and absurd figures: one ConfigError each."""
    from overlap.ops_graph.templates import ModelConfig

    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig.from_hf(_hf(**changes))


def test_a_config_that_is_a_list_is_rejected():
    """config.json holding a list, not an object."""
    from overlap.ops_graph.templates import ModelConfig

    with pytest.raises(ConfigError, match=r"^a model config must be a JSON object \(got list\)$"):
        ModelConfig.from_hf([1, 2])


@pytest.mark.parametrize(("parallel", "message"), [
    (dict(ep=512), "ep (512) must be <= n_routed_experts (256) of deepseek-v3: each EP rank holds "
                   "at least one expert"),
    (dict(ep=7), "n_routed_experts (256) of deepseek-v3 must split evenly over ep (7); valid ep: "
                 "1, 2, 4, 8, 16, 32, 64, 128, 256"),
    (dict(tp=1, moe_comm="all_gather"), "'moe_comm' all_gather gathers tokens over the tp group "
                                        "and needs tp > 1 (got tp=1)"),
    (dict(tp=1.5), "'tp' must be an integer (got 1.5)"),
])
def test_impossible_deployments_are_rejected(parallel, message):
    """More EP ranks than experts, an uneven expert split, all-gather MoE without TP."""
    from overlap.ops_graph.templates import ParallelConfig, build_model

    with pytest.raises(ConfigError, match=re.escape(message)):
        build_model("deepseek-v3", ParallelConfig(**parallel))


def test_validate_rejects_a_string_layer_number():
    """A Step built with layer "0" by API: PlanError, not a TypeError from a comparison."""
    import attrs

    from overlap.errors import PlanError
    from overlap.plan import Plan, validate

    plan = Plan.from_dict(_plan_dict())
    bad = attrs.evolve(plan, steps=[plan.steps[0]._replace(layer="0"), *plan.steps[1:]])
    with pytest.raises(PlanError, match=r"a step is \(layer, microbatch, op, stream\) with integer"):
        validate(bad)


# -- the CLI: one line, exit 2, for every case; the table in docs/errors.md ----------------------

DEEP = "[" * 50_000 + "]" * 50_000


def _config(**changes) -> str:
    return json.dumps(_hf(**changes))


def _saved_plan(edit=None) -> str:
    data = _plan_dict()
    if edit:
        edit(data)
    return json.dumps(data)


# (what was tried, argv, files written first, a part of the message that must appear)
CLI_CASES = [
    ("strategy typo", ["simulate", "--strategy", "deepseek_prefil"], {},
     "unknown strategy 'deepseek_prefil' (did you mean 'deepseek_prefill'?); valid: all,"),
    ("hardware typo", ["simulate", "--hardware", "h10"], {}, "(did you mean 'h100'?)"),
    ("model typo", ["graph", "--model", "deepseek-v4"], {}, "(did you mean 'deepseek-v3'?)"),
    ("empty strategy list", ["simulate", "--strategy", ","], {}, "'--strategy' names no strategy"),
    ("empty token list", ["compare", "--tokens", ","], {},
     "argument --tokens: expected at least one integer (got ',')"),
    ("too many microbatches", ["simulate", "--microbatches", "1000"], {},
     "argument --microbatches: must be an integer in 1..8 (got '1000')"),
    ("config.json is a list", ["graph", "--model", "config.json"], {"config.json": "[1, 2]"},
     "a model config must be a JSON object (got list)"),
    ("hidden_size null", ["graph", "--model", "config.json"],
     {"config.json": _config(hidden_size=None)}, "'hidden_size' must be an integer (got None)"),
    ("fractional dimension", ["graph", "--model", "config.json"],
     {"config.json": _config(num_attention_heads=127.5)},
     "'num_heads' must be an integer (got 127.5)"),
    ("boolean dimension", ["graph", "--model", "config.json"],
     {"config.json": _config(moe_intermediate_size=True)},
     "'moe_intermediate_size' must be an integer (got True)"),
    ("absurd dimension", ["graph", "--model", "config.json"],
     {"config.json": _config(hidden_size=10**15)}, "'hidden_size' must be <= 1048576"),
    ("negative first_k_dense_replace", ["graph", "--model", "config.json"],
     {"config.json": _config(first_k_dense_replace=-5)},
     "'first_k_dense_replace' must be >= 0 (got -5)"),
    ("deeply nested config.json", ["graph", "--model", "config.json"], {"config.json": DEEP},
     "JSON nested too deeply"),
    ("more EP ranks than experts", ["simulate", "--ep", "512"], {},
     "ep (512) must be <= n_routed_experts (256)"),
    ("uneven expert split", ["simulate", "--ep", "7"], {},
     "must split evenly over ep (7); valid ep: 1, 2, 4, 8, 16, 32, 64, 128, 256"),
    ("all-gather MoE at tp 1", ["simulate", "--ep", "1", "--moe-comm", "all_gather"], {},
     "'moe_comm' all_gather gathers tokens over the tp group and needs tp > 1"),
    ("zero tokens", ["graph", "--tokens", "0"], {}, "'--tokens' must be >= 1 (got 0)"),
    ("a billion requests", ["simulate", "--tokens", "2000000000", "--requests", "1000000000"], {},
     "'requests' must be <= 16777216 (got 1000000000)"),
    ("--json equal to -o", ["trace", "--strategy", "sequential", "-o", "t.json", "--json",
                            "t.json"], {}, "'--json' and '-o' both name 't.json'"),
    ("output under a file", ["trace", "--strategy", "sequential", "-o", "f/t.json"], {"f": ""},
     "cannot write 'f/t.json': 'f' is not a folder"),
    ("saved plan is a list", ["simulate", "--plan", "plan.json"], {"plan.json": "[]"},
     "plan file 'plan.json': not a plan: expected a JSON object (got list)"),
    ("saved plan, layer index past the end", ["simulate", "--plan", "plan.json"],
     {"plan.json": lambda: _saved_plan(lambda d: d["model"]["layers"].__setitem__(3, 9))},
     "layer 3 names graph 9; valid: 0..1"),
    ("saved plan, string layer number", ["trace", "--plan", "plan.json"],
     {"plan.json": lambda: _saved_plan(lambda d: d["steps"][0].__setitem__(0, "0"))},
     "plan field 'steps' must be a list of [int, int, str, int] rows"),
    ("saved plan, microbatches overlap", ["simulate", "--plan", "plan.json"],
     {"plan.json": lambda: _saved_plan(lambda d: d["micro"][1].__setitem__(0, 100))},
     "microbatch 1 covers tokens 100..256 but must start at 128"),
    ("saved plan, deeply nested", ["simulate", "--plan", "plan.json"], {"plan.json": DEEP},
     "plan JSON is nested too deeply to read"),
    ("saved plan missing", ["simulate", "--plan", "nope.json"], {},
     "cannot read plan file 'nope.json': No such file or directory"),
]


def run_cli(argv: list[str], files: dict) -> tuple[int, str]:
    """Write ``files`` in the current folder, run the CLI in-process; (status, stderr)."""
    import io

    for name, content in files.items():
        Path(name).write_text(content() if callable(content) else content)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*argv, "--tokens", "256"] if "--tokens" not in argv and argv[0] != "graph"
                    else argv)
    return code, err.getvalue()


@pytest.mark.parametrize(("what", "argv", "files", "part"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line(tmp_path, monkeypatch, what, argv, files, part):
    """Each bad input ends as exit status 2 and a single 'overlap ...: error: ...' line."""
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(argv, files)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("overlap") and ": error: " in err, err
    assert part in err


INTERRUPTED = "overlap: interrupted"
LONG = ["compare", "--tokens", "1024,2048,4096,8192", "--ep", "8,16,32,64", "--strategy", "all"]


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    """SIGINT in the middle of a long comparison (about 10 s of work): exit status 130 and one
    line, no traceback."""
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Say when main is about to run, so the signal lands in the command, not in start-up
    # (however slow start-up is on a loaded machine).
    code = f"import sys; from overlap.cli import main; print('ready', flush=True); sys.exit(main({LONG!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with deadline(120):
        assert proc.stdout.readline() == "ready\n"
    time.sleep(1)  # inside the comparison (about 10 s of work)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert (proc.returncode, err) == (130, INTERRUPTED + "\n")


def errors_table() -> str:
    """docs/errors.md's table: each CLI case with the line a user sees (run from a scratch
    folder)."""
    import tempfile

    rows = ["| what was tried | command | what the user sees |", "|---|---|---|"]
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        try:
            for what, argv, files, _ in CLI_CASES:
                shown = [*argv] if "--tokens" in argv or argv[0] == "graph" else [*argv, "--tokens", "256"]
                _, err = run_cli(argv, files)
                made = f" ({', '.join(files)} written first)" if files else ""
                cmd = "overlap " + " ".join(shown)
                rows.append(f"| {what}{made} | `{cmd}` | `{err.strip()}` |".replace("|`", "| `"))
        finally:
            os.chdir(here)
    rows.append(f"| Ctrl-C (exit status 130) | `overlap {' '.join(LONG)}` | `{INTERRUPTED}` |")
    return "\n".join(rows)


ERRORS_DOC = ROOT / "docs" / "errors.md"
BEGIN, END = "<!-- cases: begin (generated by tests/test_bad_inputs.py) -->", "<!-- cases: end -->"


def test_errors_doc_shows_what_users_see():
    """docs/errors.md's table is the current output of every case (regenerate with
    `python -m tests.test_bad_inputs`)."""
    text = ERRORS_DOC.read_text()
    table = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()
    assert table == errors_table(), "docs/errors.md is stale: run python -m tests.test_bad_inputs"


if __name__ == "__main__":  # rewrite the table in docs/errors.md
    text = ERRORS_DOC.read_text()
    head, rest = text.split(BEGIN)
    ERRORS_DOC.write_text(f"{head}{BEGIN}\n{errors_table()}\n{END}{rest.split(END)[1]}")


# -- saved plans replay ----------------------------------------------------------------------------


def test_simulate_and_trace_replay_a_saved_plan(tmp_path, capsys):
    """`plan --format json` saved to a file, then `simulate --plan` and `trace --plan`, predict
    the same step time as simulating the strategy directly."""
    base = ["--strategy", "deepseek_prefill", "--tokens", "1024"]
    assert main(["plan", *base, "--json", str(tmp_path / "plan.json")]) == 0
    assert main(["trace", *base, "-o", str(tmp_path / "direct.json"),
                 "--json", str(tmp_path / "direct-m.json")]) == 0
    assert main(["trace", "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "t.json"),
                 "--json", str(tmp_path / "replay-m.json")]) == 0
    direct = json.loads((tmp_path / "direct-m.json").read_text())["metrics"]
    replay = json.loads((tmp_path / "replay-m.json").read_text())["metrics"]
    assert replay["step_s"] == direct["step_s"] and replay["strategy"] == "deepseek_prefill"
    assert main(["simulate", "--plan", str(tmp_path / "plan.json"), "--no-plot", "--out",
                 str(tmp_path), "--json", str(tmp_path / "sim.json")]) == 0
    sim = json.loads((tmp_path / "sim.json").read_text())
    assert [r["strategy"] for r in sim["results"]] == ["sequential", "deepseek_prefill"]
    assert sim["results"][1]["step_s"] == direct["step_s"]
    capsys.readouterr()


def test_large_prefill_benchmark_runs(tmp_path):
    """benchmarks/bad_inputs.py runs a small case end to end (its timing is not asserted)."""
    import subprocess
    import sys

    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bad_inputs.py"), "--requests",
                          "2000", "--json", str(out)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["strategy"] for r in rows] == ["sequential", "all"] and rows[1]["best"].startswith("best:")


def test_batch_size_is_capped():
    """More than MAX_REQUESTS requests is one ConfigError (checked before building them)."""
    from overlap.plan import Batch
    from overlap.plan.batch import MAX_REQUESTS

    for build in (lambda: Batch.decode(MAX_REQUESTS + 1, 10),
                  lambda: Batch.prefill(2 * MAX_REQUESTS, MAX_REQUESTS + 1)):
        with pytest.raises(ConfigError, match=f"{MAX_REQUESTS}"):
            build()


def test_million_request_batch_shares_request_objects():
    """Equal requests are one object, so a 1M-request batch and its split stay small."""
    from overlap.plan import Batch, split

    batch = Batch.of([(1, 0)] * 1_000_000)
    assert len({id(r) for r in batch.requests}) == 1
    s = split(batch, 2)
    assert s.token_counts == (500_000, 500_000) and s.micro[1].shape.requests == 500_000


# -- every loader: a valid object or one OverlapError ---------------------------------------------

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _small_plan():
    from overlap.ops_graph.templates import ParallelConfig, build_model
    from overlap.plan import Batch, build_plan, split

    model = build_model("deepseek-v3", ParallelConfig(tp=2, ep=16), num_layers=4)
    return build_plan("deepseek_prefill", model, split(Batch.of([(40, 0), (24, 8)]), 2,
                                                       split_requests=True))


SMALL_PLAN = _small_plan().to_dict()
SMALL_GRAPH = SMALL_PLAN["model"]["graphs"][1]


@FUZZ
@given(st.one_of(mutated(SMALL_GRAPH), json_values))
def test_graph_loader_gives_a_graph_or_one_error(doc):
    """Graph.from_dict on edited or random JSON."""
    from overlap.ops_graph import Graph

    try:
        graph = Graph.from_dict(doc)
    except OverlapError:
        return
    assert Graph.from_dict(graph.to_dict()) == graph


@FUZZ
@given(st.one_of(mutated(SMALL_PLAN["model"]), json_values))
def test_model_graph_loader_gives_a_model_or_one_error(doc):
    """ModelGraph.from_dict on edited or random JSON."""
    from overlap.ops_graph import ModelGraph

    with contextlib.suppress(OverlapError):
        ModelGraph.from_dict(doc)


@FUZZ
@given(st.one_of(mutated(SMALL_PLAN), json_values))
def test_plan_loader_gives_a_runnable_plan_or_one_error(doc):
    """Plan.from_json then validate on edited or random JSON; what passes also simulates."""
    from overlap.backends.simulated import simulate
    from overlap.plan import Plan, validate

    try:
        plan = validate(Plan.from_json(json.dumps(doc)))
    except OverlapError:
        return
    assert simulate(plan, "910b2").makespan > 0


@FUZZ
@given(st.one_of(mutated(dict(_hf())), json_values))
def test_hf_config_loader_gives_a_buildable_model_or_one_error(doc):
    """ModelConfig.from_hf, then a 2-layer graph on EP16, on edited or random config.json."""
    from overlap.ops_graph.templates import ModelConfig, ParallelConfig, build_model

    with contextlib.suppress(OverlapError):
        build_model(ModelConfig.from_hf(doc), ParallelConfig(ep=16), num_layers=2)


@FUZZ
@given(csv_texts())
def test_csv_loader_gives_measurements_or_one_error(tmp_path_factory, text):
    """load_measurements on CSV-like text."""
    from overlap.cost import load_measurements

    path = tmp_path_factory.mktemp("csv") / "m.csv"
    path.write_text(text)
    try:
        rows = load_measurements(path)
    except OverlapError:
        return
    assert all(r.duration_s >= 0 for r in rows)


VLLM_KEYS = st.sampled_from(["enabled", "strategy", "microbatches", "min_tokens",
                             "max_imbalance", "backend", "hardware", "best_effort", "other"])


@FUZZ
@given(st.one_of(json_values, st.dictionaries(st.just("overlap"), st.one_of(
    json_values, st.dictionaries(VLLM_KEYS, json_values, max_size=4)))),
       st.one_of(st.none(), st.text(max_size=20), json_values.map(json.dumps)))
def test_vllm_config_loader_gives_a_config_or_one_error(additional, env):
    """The plugin's additional_config entry and $OVERLAP_VLLM, random and near-valid."""
    from overlap.integrations.vllm.config import ENV_VAR, load

    environ = {} if env is None else {ENV_VAR: env}
    with contextlib.suppress(OverlapError):
        load(additional, environ)
