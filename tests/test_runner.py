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
