"""Runner: checkpointed resume of interrupted multi-round episodes; misuse stops the run at once."""

from __future__ import annotations

import asyncio
import copy

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


def _store_spy(store: TraceStore) -> list[list]:
    """The batches `store.append` writes from now on, each as its list of events (copies: an episode row changes)."""
    batches: list[list] = []
    append = store.append

    def spy(events):
        batches.append([copy.copy(e) for e in (events if isinstance(events, list | tuple) else [events])])
        append(events)

    store.append = spy
    return batches


def test_an_episode_writes_its_calls_with_its_end_in_one_transaction(tmp_path, monkeypatch):
    import mlpo_agents.runner as runner

    monkeypatch.setattr(runner, "LIVE_FLUSH_S", 60.0)  # a slow first call (cold imports) must not split the batch
    team = scripted_team({"leader": ScriptedModel("end-leader", "<answer>4</answer>"),
                          "peer": ScriptedModel("end-peer", "<answer>4</answer>")}, params={"peers": 3})
    store = TraceStore(tmp_path / "t.sqlite")
    batches = _store_spy(store)
    summary = asyncio.run(run_team(team, [TASK], store, task_name="unit", progress=False))
    assert summary.correct == 1.0
    start, end = batches  # the running episode, then everything else at once
    assert [type(e).__name__ for e in start] == ["Episode"] and start[0].status == "running"
    kinds = [type(e).__name__ for e in end]
    assert kinds.count("ModelCall") == 4 and kinds[-1] == "Episode" and end[-1].status == "done"
    assert {e.call_id for e in end if type(e).__name__ == "Reward" and e.call_id} <= {c.call_id for c in store.calls()}
    assert len(store.calls()) == 4


def test_a_long_episode_writes_its_calls_as_it_goes(tmp_path, monkeypatch):
    """An episode running longer than LIVE_FLUSH_S (here 0) shows its calls in the store before it ends, and so
    does every call of a checkpointed graph (a resumed episode needs the calls made before the interruption)."""
    import mlpo_agents.runner as runner

    monkeypatch.setattr(runner, "LIVE_FLUSH_S", 60.0)  # a slow first call (cold imports) must not write early
    seen_by_leader: list[int] = []
    store = TraceStore(tmp_path / "t.sqlite")

    def leader(messages):
        seen_by_leader.append(len(store.calls()))
        return "<answer>4</answer>"

    team = scripted_team({"leader": ScriptedModel("live-leader", leader),
                          "peer": ScriptedModel("live-peer", "<answer>4</answer>")}, params={"peers": 2})
    asyncio.run(run_team(team, [TASK], store, task_name="unit", progress=False))
    assert seen_by_leader == [0]  # held: the peers' calls are written with the episode's end
    monkeypatch.setattr(runner, "LIVE_FLUSH_S", 0.0)
    asyncio.run(run_team(team, [Task("t/1", "What is 3+1?", "4", "math", {})], store, task_name="unit",
                         progress=False))
    assert seen_by_leader == [0, 5]  # the first episode's 3 calls, then this one's two peers
    monkeypatch.setattr(runner, "LIVE_FLUSH_S", 60.0)  # a checkpointed graph writes every call all the same
    asyncio.run(run_team(team, [Task("t/2", "What is 1+3?", "4", "math", {})], store, task_name="unit",
                         progress=False, checkpoints=tmp_path / "ckpt.sqlite"))
    assert seen_by_leader == [0, 5, 8]


def test_calls_of_an_episode_that_crashed_or_was_cancelled_stay_recorded(tmp_path):
    store = TraceStore(tmp_path / "t.sqlite")
    gate = asyncio.Event()

    def crash(messages):
        raise KeyError("not a model error")

    class Crash(ModelClient):
        async def acomplete(self, messages, **kw):
            if kw["role"] == "leader":
                raise KeyError("simulated crash")
            return await super().acomplete(messages, **kw)

    class Hang(ModelClient):
        async def acomplete(self, messages, **kw):
            if kw["role"] == "leader":
                gate.set()
                await asyncio.sleep(3600)
            return await super().acomplete(messages, **kw)

    team = scripted_team({"leader": ScriptedModel("crash-leader", crash),
                          "peer": ScriptedModel("crash-peer", "<answer>4</answer>")}, params={"peers": 2})
    summary = asyncio.run(run_team(team, [TASK], store, task_name="unit", progress=False, client=Crash(team, store)))
    assert summary.failed == 1
    (crashed,) = store.episodes()
    assert crashed.status == "failed" and len(store.calls(episode_id=crashed.episode_id)) == 2

    async def cancel_mid_episode():
        run = asyncio.create_task(run_team(team, [Task("t/1", "What is 3+1?", "4", "math", {})], store,
                                           task_name="unit", progress=False, client=Hang(team, store)))
        await gate.wait()
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

    asyncio.run(cancel_mid_episode())
    cancelled = next(e for e in store.episodes() if e.episode_id != crashed.episode_id)
    assert cancelled.status == "interrupted" and len(store.calls(episode_id=cancelled.episode_id)) == 2
