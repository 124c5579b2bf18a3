"""`mlpo run`, `mlpo traces` and `mlpo graph` end to end on the `tiny` team, in the default tier (seconds).

`arithmetic` is generated in code (tests/_commands.py DATA_FREE_TASKS), so nothing here needs the
benchmark folder. One `mlpo run` writes the store that the `traces` tests read.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from mlpo_agents.cli import main
from mlpo_agents.config import load_team
from mlpo_agents.trace import TraceStore
from tests._commands import DATA_FREE_TASKS

TASK = "arithmetic"
QUESTIONS = 2
assert TASK in DATA_FREE_TASKS  # runs without the benchmark folder


def mlpo(*argv: str) -> tuple[int, str, str]:
    """Run `mlpo argv` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, str]:
    """One `mlpo run --team tiny --task arithmetic`: the store it wrote and what it printed."""
    traces = tmp_path_factory.mktemp("cli_fast") / "traces.sqlite"
    code, out, err = mlpo("run", "--team", "tiny", "--task", TASK, "--limit", str(QUESTIONS), "--traces", str(traces))
    assert code == 0, err
    return traces, out


def test_run_records_every_episode_with_its_calls_and_reward(run):
    traces, out = run
    assert out.startswith("accuracy ") and f"/{QUESTIONS})" in out and "calls " in out
    with TraceStore(traces) as store:
        episodes = store.episodes()
        assert len(episodes) == QUESTIONS
        assert len({e.task_id for e in episodes}) == QUESTIONS
        for ep in episodes:
            assert (ep.task, ep.team, ep.topology) == (TASK, "tiny", "leader_peers")
            assert ep.status in ("done", "degraded") and ep.finished_at is not None
            calls = store.calls(episode_id=ep.episode_id)
            # leader_peers with peers=2, rounds=1: both peers answer, then the leader.
            assert sorted(c.role for c in calls) == ["leader", "peer", "peer"]
            for c in calls:
                assert c.base_model == "tiny-test" and c.version == "base"
                assert c.completion_token_ids and len(c.completion_token_ids) == len(c.logprobs)
        correct = [r for r in store.rewards(name="correct") if r.call_id is None]  # one per episode
        assert sorted(r.episode_id for r in correct) == sorted(e.episode_id for e in episodes)
        assert all(r.value in (0.0, 1.0) for r in correct)
    assert f"({sum(r.value for r in correct):.0f}/{QUESTIONS})" in out  # what it printed is what it recorded


def test_traces_show_lists_the_episodes(run):
    traces, _ = run
    code, out, err = mlpo("traces", "show", "--traces", str(traces))
    assert code == 0, err
    head, *rows = out.rstrip("\n").split("\n")
    assert head.startswith(f"{traces}: {QUESTIONS} episodes") and f"{QUESTIONS * 3} calls" in head
    with TraceStore(traces) as store:
        episodes = store.episodes()
    assert len(rows) == QUESTIONS
    for ep, row in zip(episodes, rows, strict=True):
        assert ep.episode_id in row and f"{TASK}/{ep.task_id}" in row and "tiny" in row
        assert f"answer={ep.final_answer!r}" in row


def test_traces_show_episode_prints_its_calls(run):
    traces, _ = run
    with TraceStore(traces) as store:
        episode = store.episodes()[0]
        calls = store.calls(episode_id=episode.episode_id)
    code, out, err = mlpo("traces", "show", "--traces", str(traces), "--episode", episode.episode_id[:8])
    assert code == 0, err
    lines = out.rstrip("\n").split("\n")  # one line a call, in recording order
    assert len(lines) == len(calls) == 3
    for call, line in zip(calls, lines, strict=True):
        assert line.split()[:3] == [call.node, call.agent, f"r{call.round}"]
        assert f"{call.prompt_tokens}+{call.completion_tokens} tok" in line
        assert " ".join(call.text.split())[:90] in line
    assert sorted(line.split()[1] for line in lines) == ["leader", "peer-1", "peer-2"]


def test_traces_show_unknown_episode_is_one_line_with_the_fix(run, capsys):
    traces, _ = run
    assert main(["traces", "show", "--traces", str(traces), "--episode", "zzzz"]) == 2
    err = capsys.readouterr().err.strip()
    assert "zzzz" in err and "mlpo traces show" in err and len(err.splitlines()) == 1


def test_graph_prints_the_tiny_team_topology_as_mermaid(tmp_path):
    team = load_team("tiny")
    params = json.dumps(team.params)
    code, out, err = mlpo("graph", "--topology", team.topology, "--params", params)
    assert code == 0, err
    assert "graph TD;" in out
    nodes = {line.strip() for line in out.splitlines()}
    for role in team.roles:  # every role of the team is a node of the diagram
        assert f"{role}({role})" in nodes
    assert "peer --> leader;" in nodes  # the leader reads the peers' answers
    assert "__start__ -.-> peer;" in nodes and "leader -.-> __end__;" in nodes
    written = tmp_path / "graph.mmd"
    code, out_file, err = mlpo("graph", "--topology", team.topology, "--params", params, "--out", str(written))
    assert code == 0 and out_file == "" and f"wrote {written}" in err
    assert written.read_text().rstrip("\n") == out.rstrip("\n")  # the same diagram, into the file
