"""Leader-with-peers topology against scripted models: who sees what, rounds, fan-out, degraded runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mlpo_agents.graphs import build_topology
from mlpo_agents.graphs.leader_peers import build_leader_peers
from mlpo_agents.runner import run_team
from mlpo_agents.tasks.base import Task
from mlpo_agents.testing import ScriptedModel, scripted_team
from mlpo_agents.trace import TraceStore

TASK = Task(id="t/0", question="What is 2+2?", answer="4", kind="math", meta={})


def peer_reply(messages):
    text = messages[-1]["content"]
    return "I revised: <answer>4</answer>" if "team leader wrote" in text else "I think <answer>5</answer>"


def run(team, store, tasks=(TASK,), **kw):
    return asyncio.run(run_team(team, list(tasks), store, task_name="unit", progress=False, **kw))


@pytest.fixture
def store(tmp_path: Path) -> TraceStore:
    return TraceStore(tmp_path / "traces.sqlite")


def test_round0_leader_sees_question_and_every_peer_answer(store):
    leader = ScriptedModel("lp-leader", "Peers say 5 but 2+2 is 4. <answer>4</answer>")
    peer = ScriptedModel("lp-peer", peer_reply)
    team = scripted_team({"leader": leader, "peer": peer}, params={"peers": 3, "rounds": 1})
    summary = run(team, store)

    assert summary.accuracy == 1.0 and summary.episodes == 1
    assert len(peer.seen) == 3 and all(p.startswith("What is 2+2?") for p in peer.prompts)
    (leader_prompt,) = leader.prompts
    assert leader_prompt.startswith("What is 2+2?")
    assert leader_prompt.count("I think <answer>5</answer>") == 3
    assert "[Agent 1]" in leader_prompt and "[Agent 3]" in leader_prompt and "[Agent 4]" not in leader_prompt


def test_later_rounds_peers_see_leader_output_and_their_previous_answer(store):
    leader = ScriptedModel("lp2-leader", "LEADER-SAYS <answer>4</answer>")
    peer = ScriptedModel("lp2-peer", peer_reply)
    team = scripted_team({"leader": leader, "peer": peer}, params={"peers": 2, "rounds": 3})
    run(team, store)

    assert len(peer.seen) == 6 and len(leader.seen) == 3
    revisions = peer.prompts[2:]
    assert all("LEADER-SAYS" in p and "Your previous answer" in p for p in revisions)
    assert "I revised" in leader.prompts[1] and "I think" not in leader.prompts[1]
    calls = store.calls()
    assert sorted({(c.role, c.round) for c in calls}) == [
        ("leader", 0), ("leader", 1), ("leader", 2), ("peer", 0), ("peer", 1), ("peer", 2)
    ]
    assert {c.node for c in calls} == {"leader", "peer"}
    assert {c.agent for c in calls if c.role == "peer"} == {"peer-1", "peer-2"}


def test_solo_leader_sees_only_the_question(store):
    leader = ScriptedModel("solo-leader", "<answer>4</answer>")
    team = scripted_team({"leader": leader}, params={"peers": 0, "rounds": 1})
    run(team, store)
    (prompt,) = leader.prompts
    assert prompt.startswith("What is 2+2?\n\n") and "Proposed solutions" not in prompt


def test_leader_sampling_fan_out_shares_group_and_each_sample_is_rewarded(store):
    replies = iter(["<answer>4</answer>", "<answer>3</answer>", "<answer>4</answer>", "no answer"])
    leader = ScriptedModel("fan-leader", lambda m: next(replies))
    peer = ScriptedModel("fan-peer", "<answer>4</answer>")
    team = scripted_team({"leader": leader, "peer": peer}, params={"peers": 1, "leader_samples": 4})
    run(team, store)

    leader_calls = store.calls(role="leader")
    assert len(leader_calls) == 4 and len({c.group_id for c in leader_calls}) == 1
    assert [c.sample_index for c in leader_calls] == [0, 1, 2, 3]
    assert len({tuple(c.prompt_token_ids) for c in leader_calls}) == 1
    by_call = {r.call_id: r.value for r in store.rewards(name="correct") if r.call_id}
    assert [by_call[c.call_id] for c in leader_calls] == [1.0, 0.0, 1.0, 0.0]
    (episode_reward,) = [r for r in store.rewards(name="correct") if r.call_id is None]
    assert episode_reward.value == 1.0  # the run continues with sample 0


def test_failed_peer_is_recorded_and_leader_answers_with_the_rest(store):
    def flaky(messages):
        flaky.count += 1
        if flaky.count == 2:
            raise RuntimeError("peer backend exploded")
        return "<answer>4</answer>"

    flaky.count = 0
    leader = ScriptedModel("deg-leader", "<answer>4</answer>")
    peer = ScriptedModel("deg-peer", flaky)
    team = scripted_team({"leader": leader, "peer": peer}, params={"peers": 3})
    summary = run(team, store)

    assert summary.degraded == 1 and summary.accuracy == 1.0
    (episode,) = store.episodes()
    assert episode.status == "degraded" and episode.final_answer == "4"
    (failure,) = store.failures()
    assert failure.role == "peer" and "exploded" in failure.message
    assert leader.prompts[0].count("<answer>4</answer>") == 2


def test_leader_failing_in_a_later_round_leaves_the_previous_rounds_answer(store):
    def leader_reply(messages):
        if "I revised" in messages[-1]["content"]:  # round 1: the peers have revised
            raise RuntimeError("leader backend exploded")
        return "<answer>4</answer>"

    leader = ScriptedModel("late-leader", leader_reply)
    peer = ScriptedModel("late-peer", peer_reply)
    team = scripted_team({"leader": leader, "peer": peer}, params={"peers": 2, "rounds": 2})
    summary = run(team, store)

    assert summary.degraded == 1 and summary.accuracy == 1.0  # the team's answer: the leader's round-0 answer
    (episode,) = store.episodes()
    assert episode.status == "degraded" and episode.final_answer == "4"
    assert len(peer.prompts) == 4 and len(leader.prompts) == 2  # the round advanced past round 0, then ended
    (failure,) = store.failures()
    assert failure.role == "leader" and failure.round == 1


def test_resume_skips_finished_episodes(store):
    leader = ScriptedModel("res-leader", "<answer>4</answer>")
    team = scripted_team({"leader": leader}, params={"peers": 0})
    tasks = [Task(id=f"t/{i}", question=f"q{i}", answer="4", kind="math", meta={}) for i in range(3)]
    run(team, store, tasks[:2])
    summary = run(team, store, tasks, resume=True)
    assert summary.skipped == 2 and summary.episodes == 1
    assert len(store.episodes(status="done")) == 3


def test_mermaid_snapshot():
    assert build_leader_peers(peers=2, rounds=2).get_graph().draw_mermaid() == (
        Path(__file__).parent / "snapshots" / "leader_peers.mmd"
    ).read_text()


@pytest.mark.parametrize("params", [{"peers": -1}, {"rounds": 0}, {"leader_samples": 0}, {"nonsense": 1}])
def test_out_of_range_parameters_are_refused(params):
    with pytest.raises(ValueError, match=next(iter(params))):
        build_topology("leader_peers", **params)


def test_seeded_agents_draw_a_stream_per_question_and_round_reproducibly(tmp_path):
    """A seeded agent's calls are seeded per (agent, question, round): one seed for every question would give every
    question the same random draws (outcomes correlated across an evaluation)."""
    tasks = [TASK, Task(id="t/1", question="What is 3+3?", answer="6", kind="math", meta={})]

    def seeds(name, seed):
        team = scripted_team({"leader": ScriptedModel(f"{name}-l", "<answer>4</answer>"),
                              "peer": ScriptedModel(f"{name}-p", "<answer>4</answer>")},
                             params={"peers": 2, "rounds": 2}, name=name)  # fmt: skip
        for role in team.roles.values():
            role.sampling.seed = seed
        store = TraceStore(tmp_path / f"{name}.sqlite")
        run(team, store, tasks)
        episodes = {e.episode_id: e.task_id for e in store.episodes()}
        return {(episodes[c.episode_id], c.agent, c.round): c.sampling.get("seed") for c in store.calls()}

    first = seeds("a", 7)
    assert len(first) == 2 * 2 * 3  # questions x rounds x (leader + 2 peers)
    by_agent_round = {}
    for (_task_id, agent, round_), seed in first.items():
        by_agent_round.setdefault((agent, round_), set()).add(seed)
    assert all(len(s) == 2 for s in by_agent_round.values())  # the two questions draw different streams
    assert len({s for (t, a, r), s in first.items() if t == "t/0" and a == "leader"}) == 2  # rounds differ too
    assert len({s for (t, a, r), s in first.items() if t == "t/0" and r == 0}) == 3  # peers sharing a role seed too
    assert seeds("b", 7) == first  # reproducible from the seed
    assert set(seeds("c", 8).values()).isdisjoint(first.values())
    assert set(seeds("d", None).values()) == {None}  # unseeded stays unseeded
