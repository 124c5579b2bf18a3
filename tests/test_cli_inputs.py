"""Bad command-line input: one line naming the value and the fix, exit code 2, before any work starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlpo_agents.cli import main
from mlpo_agents.trace import open_store

ROOT = Path(__file__).resolve().parents[1]


def fails(capsys, *argv: str) -> str:
    """Run `mlpo argv`, expect exit code 2 and exactly one stderr line; return that line."""
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run(tmp_path: Path, *extra: str) -> tuple[str, ...]:
    return ("run", "--team", "tiny", "--task", "arithmetic", "--traces", str(tmp_path / "t.sqlite"), *extra)


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_limit_below_one_is_refused(capsys, tmp_path, limit):
    line = fails(capsys, *run(tmp_path, "--limit", limit))
    assert f"--limit {limit}" in line and ">= 1" in line
    assert not (tmp_path / "t.sqlite").exists()


def test_non_numeric_topology_param_names_value_and_fix(capsys, tmp_path):
    line = fails(capsys, *run(tmp_path, "--limit", "1", "--param", "peers=abc"))
    assert "peers='abc'" in line and "--param peers=" in line and "not supported" not in line
    line = fails(capsys, *run(tmp_path, "--limit", "1", "--param", "nope=1"))
    assert "'nope'" in line and "peers, rounds" in line
    assert not (tmp_path / "t.sqlite").exists()


def test_team_missing_a_role_fails_before_any_episode(capsys, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    topology = "examples.mixture_of_agents:build_mixture_of_agents"
    line = fails(capsys, *run(tmp_path, "--limit", "1", "--topology", topology, "--param", "proposers=2"))
    assert "'proposer'" in line and "'aggregator'" in line and "add `roles:" in line
    assert not (tmp_path / "t.sqlite").exists()  # no store opened, so no episode left `running`


def test_debate_without_judge_needs_no_judge_role_but_with_judge_does(capsys, tmp_path):
    line = fails(capsys, *run(tmp_path, "--limit", "1", "--topology", "debate", "--param", "rounds=2"))
    assert "'debater'" in line and "judge" not in line.split("calls")[0]


def test_question_with_a_lone_surrogate_is_rejected_at_load(capsys, tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(
        '{"question": "ok?", "answer": "#### 1"}\n{"question": "What is \\ud800?", "answer": "#### 2"}\n'
    )
    line = fails(capsys, "run", "--team", "tiny", "--task", "gsm8k", "--data-dir", str(tmp_path),
                 "--traces", str(tmp_path / "t.sqlite"))
    assert "gsm8k/test/1" in line and "'question'" in line and "surrogate" in line


def test_task_options_reach_the_loader_and_bad_ones_name_key_and_valid_keys(capsys, tmp_path):
    line = fails(capsys, *run(tmp_path, "--limit", "1", "--task-option", "colour=red"))
    assert "'colour'" in line and "max_value" in line and "num_operands" in line
    line = fails(capsys, *run(tmp_path, "--limit", "1", "--task-option", "max_value=lots"))
    assert "max_value='lots'" in line and "max_value=20" in line
    line = fails(capsys, *run(tmp_path, "--limit", "1", "--task-option", "max_value"))
    assert "key=value" in line
    line = fails(capsys, "eval", "--teams", "tiny", "--tasks", "gsm8k", "--task-option", "max_value=3",
                 "--runs-dir", str(tmp_path))
    assert "max_value" in line and "gsm8k" in line


def test_task_option_changes_the_questions_and_their_ids(capsys, tmp_path):
    from mlpo_agents.cli import _tasks, build_parser

    def ids(*extra):
        args = build_parser().parse_args(["run", "--task", "arithmetic", "--subset", "easy", "--limit", "3", *extra])
        return {t.id: t.question for t in _tasks(args)}

    plain, small = ids(), ids("--task-option", "max_value=20", "--task-option", "ops=+")
    assert all("+" in q and "-" not in q for q in small.values())
    assert not set(plain) & set(small)


def test_unknown_episode_prefix_says_so(capsys, tmp_path):
    open_store(tmp_path / "t.sqlite").close()
    assert main(["traces", "show", "--traces", str(tmp_path / "t.sqlite"), "--episode", "zzzz"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the empty-store warning
    assert "error" in last and "'zzzz'" in last


def test_one_digit_test_split_too_small_says_how_many_and_what_else(capsys, tmp_path):
    line = fails(capsys, *run(tmp_path, "--subset", "one_digit", "--limit", "8"))
    assert "only 5" in line and "--split train" in line and "--subset two_digit" in line


# ------------------------------------------------------------------------------------------- graph


def test_graph_png_never_uses_the_network(capsys, tmp_path, monkeypatch):
    import langgraph.graph.state  # noqa: F401

    monkeypatch.setenv("PATH", str(tmp_path))  # no mermaid-cli here
    line = fails(capsys, "graph", "--topology", "debate", "--png", str(tmp_path / "g.png"))
    assert "mmdc" in line and "--out" in line and "web service" in line
    assert not (tmp_path / "g.png").exists()


def test_graph_png_renders_with_a_local_mermaid_cli(capsys, tmp_path, monkeypatch):
    fake = tmp_path / "mmdc"
    fake.write_text('#!/bin/sh\n# args: -i IN -o OUT\ncp "$2" "$4"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert main(["graph", "--topology", "debate", "--png", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").read_text().startswith("---") or "graph" in (tmp_path / "g.png").read_text()


def test_graph_out_writes_mermaid_and_says_how_to_render(capsys, tmp_path):
    assert main(["graph", "--topology", "gvr", "--out", str(tmp_path / "g.mmd")]) == 0
    assert "generator" in (tmp_path / "g.mmd").read_text()
    assert "mmdc -i" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- warnings, train


def test_library_warnings_go_to_the_run_folder_log_not_the_terminal(tmp_path):
    traces = tmp_path / "run" / "t.sqlite"
    # A user topology whose builder warns, as a library deprecation would in the middle of a run.
    (tmp_path / "warner.py").write_text(
        "import warnings\n"
        "from mlpo_agents.graphs import build_topology\n\n"
        "def build(peers=2, rounds=1):\n"
        "    warnings.warn('a library deprecation', FutureWarning, stacklevel=1)\n"
        "    return build_topology('leader_peers', peers=peers, rounds=rounds)\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "mlpo_agents.cli", "run", "--team", "tiny", "--task", "arithmetic", "--limit", "1",
         "--concurrency", "1", "--traces", str(traces), "--topology", "warner:build", "--param", "peers=2"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "always::FutureWarning"},
    )
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "accuracy" in done.stdout
    assert "a library deprecation" in (tmp_path / "run" / "warnings.log").read_text()


def test_library_warnings_context_routes_and_restores(tmp_path):
    import warnings

    from mlpo_agents.cli import library_warnings

    with library_warnings(tmp_path / "w.log"):
        warnings.warn("from a library", FutureWarning, stacklevel=1)
    assert "from a library" in (tmp_path / "w.log").read_text()
    with pytest.warns(FutureWarning):  # ordinary handling is back afterwards
        warnings.warn("after", FutureWarning, stacklevel=1)


def test_train_without_learning_signal_says_no_update_was_made(capsys, tmp_path):
    traces = str(tmp_path / "t.sqlite")
    assert main(["run", "--team", "tiny", "--task", "arithmetic", "--limit", "2", "--concurrency", "2",
                 "--param", "leader_samples=2", "--traces", traces]) == 0
    capsys.readouterr()
    # The random tiny model never answers correctly: every leader group has equal (zero) rewards.
    assert main(["train", "--offline", "--traces", traces, "--team", "tiny", "--steps", "1", "--group-size", "2",
                 "--out", str(tmp_path / "out"), "--set", "progress=false"]) == 0
    captured = capsys.readouterr()
    assert '"updates": 0' in captured.out
    assert "no update was made" in captured.err and "equal rewards" in captured.err
