"""Runner: checkpointed resume of interrupted multi-round episodes; misuse stops the run at once."""

from __future__ import annotations

import asyncio

import pytest

from mlpo_agents.config import ConfigError
from mlpo_agents.models import ModelClient
from mlpo_agents.runner import run_team
from mlpo_agents.tasks.base import Task
from mlpo_agents.testing import ScriptedModel, scripted_team
from mlpo_agents.trace import TraceStore

TASK = Task(id="t/0", question="What is 2+2?", answer="4", kind="math", meta={})


class CrashOnce(ModelClient):
    """A client whose process 'crashes' (a non-model error escapes) on the first round-1 call."""

    crashed = False

    async def acomplete(self, messages, **kw):
        if kw.get("round") == 1 and not CrashOnce.crashed:
            CrashOnce.crashed = True
            raise KeyError("simulated crash")
        return await super().acomplete(messages, **kw)


def test_checkpointed_episode_resumes_without_redoing_finished_steps(tmp_path):
    # One debater, so no parallel call can be in flight when the crash happens: the count is exact.
    debater = ScriptedModel("ck-debater", "<answer>4</answer>")
    team = scripted_team({"debater": debater}, topology="debate", params={"agents": 1, "rounds": 3})
    store = TraceStore(tmp_path / "traces.sqlite")
    ckpt = tmp_path / "ckpt.sqlite"

    def go(resume):
        client = CrashOnce(team, store)
        return asyncio.run(run_team(team, [TASK], store, task_name="unit", client=client, progress=False,
                                    resume=resume, checkpoints=ckpt))

    CrashOnce.crashed = False
    first = go(resume=False)
    assert first.failed == 1 and len(debater.seen) == 1, [f.message for f in store.failures()]
    second = go(resume=True)
    assert second.episodes == 1 and second.correct == 1.0, [f.message for f in store.failures()]
    assert len(debater.seen) == 3  # round 0 was not asked again
    (episode,) = store.episodes()
    assert episode.status == "done"
    assert sorted(c.round for c in store.calls(episode_id=episode.episode_id)) == [0, 1, 2]


def test_a_role_the_team_does_not_map_stops_the_run(tmp_path):
    team = scripted_team({"leader": ScriptedModel("only-leader", "<answer>4</answer>")},
                         params={"peers": 2})
    with pytest.raises(ConfigError, match=r"no role 'peer-\d'"):
        asyncio.run(run_team(team, [TASK], TraceStore(tmp_path / "t.sqlite"), progress=False))


def test_an_episode_whose_leader_failed_is_failed_not_degraded(tmp_path):
    def down(messages):
        raise RuntimeError("leader server is down")

    team = scripted_team({"leader": ScriptedModel("down-leader", down),
                          "peer": ScriptedModel("up-peer", "<answer>4</answer>")}, params={"peers": 2})
    store = TraceStore(tmp_path / "t.sqlite")
    summary = asyncio.run(run_team(team, [TASK], store, task_name="unit", progress=False))

    assert (summary.failed, summary.degraded, summary.episodes) == (1, 0, 0)
    (episode,) = store.episodes()
    assert episode.status == "failed" and episode.final_answer is None
    reasons = {f.error_type: f.message for f in store.failures()}
    assert "NoTeamAnswer" in reasons and "leader (round 0)" in reasons["NoTeamAnswer"]
    assert any("leader server is down" in f.message for f in store.failures() if f.role == "leader")
    assert not [r for r in store.rewards() if r.call_id is None]  # nothing scored, no silent 0.0


def test_an_answer_that_does_not_parse_is_a_scored_zero_not_a_failure(tmp_path):
    team = scripted_team({"leader": ScriptedModel("mute-leader", "I am not sure.")}, params={"peers": 0})
    store = TraceStore(tmp_path / "t.sqlite")
    summary = asyncio.run(run_team(team, [TASK], store, task_name="unit", progress=False))
    assert (summary.failed, summary.episodes, summary.correct) == (0, 1, 0.0)
    assert store.episodes()[0].status == "done"
