"""Resume against a store: killed episodes become `interrupted`, and a changed task row is refused."""

from __future__ import annotations

import asyncio

import pytest

from mlpo_agents import cli
from mlpo_agents.config import ConfigError
from mlpo_agents.runner import run_team, task_fingerprint
from mlpo_agents.tasks.base import Task
from mlpo_agents.testing import ScriptedModel, scripted_team
from mlpo_agents.trace import Episode, TraceStore

TASKS = [Task(id=f"t/{i}", question=f"What is {i}+2?", answer=str(i + 2), kind="math", meta={}) for i in range(3)]


def solo(name: str):
    return scripted_team({"leader": ScriptedModel(name, lambda m: "<answer>4</answer>")}, params={"peers": 0})


def run(team, store, tasks, **kw):
    return asyncio.run(run_team(team, list(tasks), store, task_name="unit", progress=False, **kw))


def test_resume_marks_killed_episodes_interrupted_and_show_does_not_count_them(tmp_path, capsys):
    team = solo("int-leader")
    store = TraceStore(tmp_path / "traces.sqlite")
    run(team, store, TASKS[:1])
    # A kill -9 mid-episode leaves the row `running`: write what the killed run left.
    for task in TASKS[1:]:
        store.append(Episode(f"killed-{task.id}", "unit", task.id, team.name, team.topology,
                             meta={"task_sha": task_fingerprint(task)}))
    summary = run(team, store, TASKS, resume=True)

    assert summary.skipped == 1 and summary.episodes == 2
    status = {e.episode_id: e.status for e in store.episodes()}
    assert status["killed-t/1"] == status["killed-t/2"] == "interrupted"
    assert sorted(status.values()) == ["done", "done", "done", "interrupted", "interrupted"]
    store.close()

    assert cli.main(["traces", "show", "--traces", str(tmp_path / "traces.sqlite")]) == 0
    out = capsys.readouterr().out
    assert ": 3 episodes {'done': 3}" in out and "2 interrupted episodes not counted" in out


def test_resume_leaves_other_teams_running_episodes_alone(tmp_path):
    store = TraceStore(tmp_path / "traces.sqlite")
    store.append(Episode("other", "unit", "t/0", "another-team", "leader_peers"))
    run(solo("alone-leader"), store, TASKS[:1], resume=True)
    assert {e.episode_id: e.status for e in store.episodes()}["other"] == "running"


def test_resume_refuses_a_task_id_whose_question_changed(tmp_path):
    team = solo("changed-leader")
    store = TraceStore(tmp_path / "traces.sqlite")
    run(team, store, TASKS[:2])
    store.append(Episode("killed", "unit", "t/2", team.name, team.topology))
    changed = [TASKS[0], Task(id="t/1", question="What is 1+2+3?", answer="6", kind="math", meta={}), TASKS[2]]
    before = [(e.episode_id, e.status) for e in store.episodes()]

    with pytest.raises(ConfigError, match=r"task id 't/1' in .*traces.sqlite holds a different question.*"
                                          r"task definition changed.*use a new --traces file"):
        run(team, store, changed, resume=True)
    assert [(e.episode_id, e.status) for e in store.episodes()] == before  # refused before writing

    assert run(team, store, TASKS, resume=True).skipped == 2  # the same rows resume as before


def test_the_cli_prints_the_changed_task_error_in_one_line(tmp_path, capsys, monkeypatch):
    store = TraceStore(tmp_path / "traces.sqlite")
    task = Task(id="arithmetic/test/0", question="What is 7*6?", answer="42", kind="math", meta={})
    store.append(Episode("old", "arithmetic", task.id, "scripted", "leader_peers", status="done",
                         meta={"task_sha": task_fingerprint(task)}))
    store.close()
    monkeypatch.setattr(cli, "_tasks", lambda args: [Task(task.id, "What is 6*7+1?", "43", "math", {})])
    monkeypatch.setattr("mlpo_agents.config.load_team", lambda name: solo("cli-changed-leader"))
    code = cli.main(["run", "--team", "x", "--task", "arithmetic", "--resume", "--traces",
                     str(tmp_path / "traces.sqlite")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and "task definition changed" in err[-1] and "Traceback" not in "".join(err)
