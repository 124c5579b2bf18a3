"""The Team API on scripted models: invoke / ainvoke / astream, what is recorded, feedback, user topologies."""

from __future__ import annotations

import asyncio
import math

import pytest
from langgraph.graph import START, StateGraph

from mlpo_agents import Team
from mlpo_agents.config import ConfigError
from mlpo_agents.graphs.leader_peers import leader_prompt
from mlpo_agents.graphs.nodes import agent_node
from mlpo_agents.graphs.state import TeamContext, TeamState
from mlpo_agents.tasks.base import Task
from mlpo_agents.team import AgentTurn, TeamResult, UnknownEpisodeError
from mlpo_agents.testing import ScriptedModel, scripted_team
from mlpo_agents.trace import TraceStore

ROLES = ("leader",)


def build_slow_solo(pause_s: float = 30.0):
    """A user topology: the leader answers, then a node waits (an episode that is still running)."""

    async def wait(state):
        await asyncio.sleep(pause_s)
        return {"answer": state["turns"][-1]["answer"]}

    g = StateGraph(TeamState, context_schema=TeamContext)
    g.add_node("leader", agent_node("leader", leader_prompt))
    g.add_node("wait", wait)
    g.add_edge(START, "leader")
    g.add_edge("leader", "wait")
    return g.compile(name="slow_solo")


@pytest.fixture
def store(tmp_path):
    s = TraceStore(tmp_path / "traces.sqlite")
    yield s
    s.close()


def counting_leader(name="leader"):
    counter = iter(range(10_000))
    return ScriptedModel(name, lambda msgs: f"Adding them: <answer>{5 + next(counter) % 2}</answer>")


def team_of(store, **params):
    config = scripted_team(
        {"leader": counting_leader(), "peer": ScriptedModel("peer", "I think <answer>5</answer>")},
        params={"peers": 2, **params},
    )
    return Team.load(config, traces=store)


def test_invoke_answers_and_records_an_unscored_episode(store):
    team = team_of(store)
    result = team.invoke("What is 2 + 3?")
    assert isinstance(result, TeamResult)
    assert (result.answer, result.status, result.reward) == ("5", "done", None)
    assert [(t.node, t.role) for t in result.turns] == [("peer", "peer"), ("peer", "peer"), ("leader", "leader")]
    assert {t.agent for t in result.turns[:2]} == {"peer-1", "peer-2"}
    assert result.text == "Adding them: <answer>5</answer>" and len(result.samples) == 1
    (episode,) = store.episodes()
    assert (episode.episode_id, episode.task, episode.status, episode.final_answer) == (
        result.episode_id, "free", "done", "5")
    assert episode.task_id.startswith("free/")
    assert sorted(c.call_id for c in store.calls(episode_id=result.episode_id)) == sorted(
        t.call_id for t in result.turns)
    assert store.rewards() == []  # no gold answer: no correctness reward, not a silent 0


def test_a_task_with_a_gold_answer_is_scored_like_a_run(store):
    team = team_of(store)
    task = Task("unit/1", "What is 2 + 3?", "5", "math")
    result = asyncio.run(team.ainvoke(task=task))
    assert result.reward == 1.0
    episode_rewards = [r for r in store.rewards(episode_id=result.episode_id, name="correct") if r.call_id is None]
    assert [r.value for r in episode_rewards] == [1.0]
    assert store.episodes()[0].task_id == "unit/1"


def test_messages_become_the_question_with_its_context(store):
    leader = counting_leader()
    team = Team.load(scripted_team({"leader": leader}, params={"peers": 0}), traces=store)
    team.invoke([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "What is 2 + 3?"}])
    prompt = leader.prompts[-1]
    assert "Conversation so far:\nsystem: You are terse.\nuser: Hi\nassistant: Hello" in prompt
    assert "Question: What is 2 + 3?" in prompt
    with pytest.raises(ValueError, match="no user message"):
        team.invoke([{"role": "assistant", "content": "x"}])


def test_astream_yields_each_turn_as_it_finishes_then_the_result(store):
    team = team_of(store)

    async def collect():
        return [event async for event in team.astream("What is 2 + 3?")]

    events = asyncio.run(collect())
    assert [type(e).__name__ for e in events] == ["AgentTurn"] * 3 + ["TeamResult"]
    assert events[-1].turns == events[:3] and events[2].role == "leader"


def test_samples_feedback_per_sample_and_per_episode(store, tmp_path):
    team = team_of(store)
    result = team.invoke("What is 2 + 3?", samples=3)
    assert [s.sample_index for s in result.samples] == [0, 1, 2]
    assert len({s.group_id for s in result.samples}) == 1
    reward = team.feedback(result.episode_id, 1.0, reason="right", sample=1)
    assert reward.call_id == result.samples[1].call_id and reward.meta["reason"] == "right"
    team.feedback(result.episode_id, -1.0)
    recorded = store.rewards(episode_id=result.episode_id, name="feedback")
    assert [(r.value, r.call_id) for r in recorded] == [(1.0, result.samples[1].call_id), (-1.0, None)]

    # A later process (a new Team on the same store) finds the episode's samples in the store.
    again = Team.load(team.config, traces=TraceStore(tmp_path / "traces.sqlite"))
    assert again.feedback(result.episode_id, 0.0, sample=2).call_id == result.samples[2].call_id
    with pytest.raises(UnknownEpisodeError, match="no episode 'nope'"):
        again.feedback("nope", 1.0)
    with pytest.raises(ValueError, match="sample=3: episode .* has 3 sample"):
        team.feedback(result.episode_id, 1.0, sample=3)
    with pytest.raises(ValueError, match="finite"):
        team.feedback(result.episode_id, math.nan)


def test_a_user_topology_runs_and_refuses_samples_it_cannot_draw(store):
    config = scripted_team({"leader": counting_leader()}, topology="tests.test_team_api:build_slow_solo",
                           params={"pause_s": 0.0})
    team = Team.load(config, traces=store)
    result = team.invoke("What is 2 + 3?")
    assert result.status == "done" and [t.node for t in result.turns] == ["leader"] and result.answer == "5"
    with pytest.raises(ConfigError, match="cannot draw 2 answers"):
        team.invoke("What is 2 + 3?", samples=2)


def test_closing_the_stream_early_records_the_episode_interrupted(store):
    config = scripted_team({"leader": counting_leader()}, topology="tests.test_team_api:build_slow_solo")
    team = Team.load(config, traces=store)

    async def first_turn_then_leave():
        stream = team.astream("What is 2 + 3?")
        first = await anext(stream)
        await stream.aclose()
        return first

    first = asyncio.run(first_turn_then_leave())
    assert isinstance(first, AgentTurn)
    (episode,) = store.episodes()
    assert episode.status == "interrupted" and episode.finished_at is not None
    assert [f.error_type for f in store.failures(episode_id=episode.episode_id)] == ["Cancelled"]
    assert [c.call_id for c in store.calls(episode_id=episode.episode_id)] == [first.call_id]


def test_load_overrides_and_misuse(store):
    team = team_of(store)
    assert Team.load(team.config, traces=store, peers=1).config.params["peers"] == 1
    solo = Team.load(team.config, traces=store, topology="tests.test_team_api:build_slow_solo", pause_s=0.0)
    assert solo.config.params == {"pause_s": 0.0}  # the team's leader_peers params are dropped
    assert solo.invoke("What is 2 + 3?").answer in ("5", "6")
    with pytest.raises(ValueError, match="ask a question"):
        team.invoke()

    async def inside_a_loop():
        team.invoke("What is 2 + 3?")

    with pytest.raises(RuntimeError, match="await team.ainvoke"):
        asyncio.run(inside_a_loop())
