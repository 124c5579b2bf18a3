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
    debater = ScriptedModel("ck-debater", "<answer>4</answer>")
    team = scripted_team({"debater": debater}, topology="debate", params={"agents": 2, "rounds": 2})
    store = TraceStore(tmp_path / "traces.sqlite")
    ckpt = tmp_path / "ckpt.sqlite"

    def go(resume):
        client = CrashOnce(team, store)
        return asyncio.run(run_team(team, [TASK], store, task_name="unit", client=client, progress=False,
                                    resume=resume, checkpoints=ckpt))

    first = go(resume=False)
    # Round 0 finished; one round-1 debater crashed (its parallel twin may have finished).
    assert first.failed == 1 and len(debater.seen) in (2, 3)
    second = go(resume=True)
    assert second.episodes == 1 and second.correct == 1.0
    assert len(debater.seen) == 4  # nothing finished before the crash was asked again
    (episode,) = store.episodes()
    assert episode.status == "done"
    assert sorted(c.round for c in store.calls(episode_id=episode.episode_id)) == [0, 0, 1, 1]


def test_a_role_the_team_does_not_map_stops_the_run(tmp_path):
    team = scripted_team({"leader": ScriptedModel("only-leader", "<answer>4</answer>")},
                         params={"peers": 2})
    with pytest.raises(ConfigError, match=r"no role 'peer-\d'"):
        asyncio.run(run_team(team, [TASK], TraceStore(tmp_path / "t.sqlite"), progress=False))
