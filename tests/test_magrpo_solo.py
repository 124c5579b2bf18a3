"""MAGRPO's `solo_fraction`: some of a step's questions asked to the answering agent alone (G samples each),
their groups trained in the answering agent's update only, with their own group-relative advantages."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mlpo_agents.rewards import RewardResult
from mlpo_agents.rubric import Rubric, use_rubric
from mlpo_agents.trace import Reward, TraceStore
from mlpo_agents.trainers.magrpo import MAGRPOConfig, step_batches
from tests.test_magrpo import AGENTS, call, correct


def test_solo_fraction_is_validated():
    for bad in (1.0, -0.25):
        with pytest.raises(ValueError, match=rf"solo_fraction={bad}: must be in \[0, 1\)"):
            MAGRPOConfig(solo_fraction=bad)
    assert MAGRPOConfig(solo_fraction=0.5).solo_fraction == 0.5


def test_solo_groups_join_the_answering_agents_batch_with_their_own_advantages(tmp_path):
    # Team question t0 (episode e1): two aligned joint actions, R = (1, 0). Solo question t1 (episode e2): the
    # solver alone as `leader`, three samples in one group, correct (1, 0, 0) and answered (1, 1, 0).
    store = TraceStore(tmp_path / "traces.sqlite")
    store.append([
        call("d0", "drafter", group="gd", index=0), call("d1", "drafter", group="gd", index=1),
        call("s0", "solver", group="a", parent="d0"), call("s1", "solver", group="b", parent="d1"),
        *[call(f"l{i}", "leader", group="gl", index=i, episode="e2") for i in range(3)],
    ])  # fmt: skip
    store.append([correct("s0", 1.0), correct("s1", 0.0), *[Reward("e1", "answered", 0.0, call_id=s) for s in ("s0", "s1")]])
    store.append([correct(f"l{i}", v, episode="e2") for i, v in enumerate((1.0, 0.0, 0.0))])
    store.append([Reward("e2", "answered", v, call_id=f"l{i}") for i, v in enumerate((1.0, 1.0, 0.0))])
    team, solo = (SimpleNamespace(results=[SimpleNamespace(episode_id=e, task_id=t)]) for e, t in (("e1", "t0"), ("e2", "t1")))
    agents = {role: SimpleNamespace(base_model="tiny", pad_token_id=0) for role in AGENTS}
    config = MAGRPOConfig(solo_fraction=0.5, questions_per_step=2, format_weight=0.5, format_reward="answered")

    actions, batches, missing, skipped, metrics = step_batches(store, team, ["t1", "t0"], agents, config, solo)

    assert [a.key for a in actions] == ["s0", "s1"] and missing == {}, "the team's joint actions are its own"
    solver, drafter = batches["solver"], batches["drafter"]
    assert solver.call_ids == ["s0", "s1", "l0", "l1", "l2"] and solver.group_ids == ["gd", "gl"]
    assert drafter.call_ids == ["d0", "d1"], "no solo rows for the drafter"
    # Solo R = correct + 0.5 answered = (1.5, 0.5, 0), mean 2/3: A = R - 2/3; the team's A = (0.5, -0.5).
    torch.testing.assert_close(solver.rewards, torch.tensor([1.0, 0.0, 1.5, 0.5, 0.0]))
    torch.testing.assert_close(solver.advantages, torch.tensor([0.5, -0.5, 5 / 6, -1 / 6, -2 / 3]))
    torch.testing.assert_close(drafter.advantages, torch.tensor([0.5, -0.5]))
    assert metrics == pytest.approx({"reward/correct_solo": 1 / 3, "reward/mean_solo": 2 / 3})
    assert skipped == {"no_reward": 0, "after_termination": 0}

    # std_scale: each group divided by its own std, the solo group's by std(1.5, 0.5, 0).
    std_config = MAGRPOConfig(solo_fraction=0.5, format_weight=0.5, format_reward="answered", std_scale=True)
    scaled = step_batches(store, team, ["t1", "t0"], agents, std_config, solo)[1]["solver"].advantages
    solo_r = torch.tensor([1.5, 0.5, 0.0])
    torch.testing.assert_close(scaled[2:], (solo_r - solo_r.mean()) / (solo_r.std() + 1e-4))
    store.close()


def parity(task, completion):
    """A reward the random tiny model earns on about half of its outputs (the team's answer: the episode's last
    output, which the tiny model never gives under the strict rule)."""
    text = completion.text or (completion.state.get("turns") or [{"text": ""}])[-1]["text"]
    value = float(sum(text.encode()) % 2)
    return RewardResult(value, text[-20:], "correct" if value else "wrong")


def test_a_tiny_run_asks_one_question_a_step_to_the_solver_alone_and_trains_it_on_them(tmp_path, monkeypatch):
    """solo_fraction=0.5, 2 questions a step: one as a team, one to the solver alone with G samples from its
    current adapter; the solver's update holds both, the drafter's only the team's."""
    import mlpo_agents.trainers.magrpo as magrpo

    updates: list[tuple[str, object]] = []

    def recording(agent, batch, config):
        updates.append((agent.role, batch))
        return update_agent(agent, batch, config)

    update_agent = magrpo.update_agent
    monkeypatch.setattr(magrpo, "update_agent", recording)
    config = MAGRPOConfig(
        model="tiny-test", task="arithmetic", out=str(tmp_path), steps=2, group_size=3, questions_per_step=2,
        train_questions=4, max_tokens=6, lr=1e-2, micro_batch_size=8, progress=False, concurrency=4,
        solo_fraction=0.5,
    )  # fmt: skip
    with use_rubric(Rubric.for_kind("math").replace("correct", parity)):
        result = magrpo.train(config)

    assert [role for role, _ in updates] == ["drafter", "solver"] * 2, "one update per agent per step"
    store = TraceStore(tmp_path / "traces.sqlite")
    solo_episodes = store.episodes(team="cooperate-solver-alone")
    team_episodes = store.episodes(team="cooperate")
    assert len(solo_episodes) == 2 and len(team_episodes) == 2, "one question alone, one as a team, per step"
    assert {e.topology for e in solo_episodes} == {"leader_peers"}
    for step, (alone, joint) in enumerate(zip(solo_episodes, team_episodes, strict=True), 1):
        assert alone.task_id != joint.task_id
        calls = store.calls(episode_id=alone.episode_id)
        assert [c.role for c in calls] == ["leader"] * 3 and len({c.group_id for c in calls}) == 1, "G samples, one group"
        assert {c.version for c in calls} == {"base" if step == 1 else "solver-step-1"}, "the solver's current adapter"
        assert {c.sampling["temperature"] for c in calls} == {config.temperature}
        assert {c.role for c in store.calls(episode_id=joint.episode_id)} == set(AGENTS)
        rewards = {r.call_id: r.value for r in store.rewards(episode_id=alone.episode_id, name="correct")}
        by_role = dict(updates[2 * (step - 1) : 2 * step])
        solver, drafter = by_role["solver"], by_role["drafter"]
        rows = [solver.call_ids.index(c.call_id) for c in calls]  # every solo sample is a solver row
        r = torch.tensor([rewards[c.call_id] for c in calls])
        torch.testing.assert_close(solver.advantages[rows], r - r.mean())
        assert len(solver) == 3 + 3, "the team question's G answers beside the G solo samples"
        assert set(drafter.call_ids) <= {c.call_id for c in store.calls(episode_id=joint.episode_id, role="drafter")}
        logged = next(row for row in result.history if row.get("step") == step and "reward/correct_solo" in row)
        assert logged["reward/correct_solo"] == pytest.approx(r.mean().item())
    store.close()


def test_solo_groups_begin_after_solo_from_step(tmp_path):
    """Recipe B as one run: step 1 is joint actions only (`solo_from_step=1`), step 2 mixes in a solo group."""
    import mlpo_agents.trainers.magrpo as magrpo

    with pytest.raises(ValueError, match="solo_from_step >= 0"):
        MAGRPOConfig(solo_from_step=-1)
    config = MAGRPOConfig(
        model="tiny-test", task="arithmetic", out=str(tmp_path), steps=2, group_size=2, questions_per_step=2,
        train_questions=4, max_tokens=4, lr=1e-2, micro_batch_size=8, progress=False, concurrency=4,
        solo_fraction=0.5, solo_from_step=1,
    )  # fmt: skip
    with use_rubric(Rubric.for_kind("math").replace("correct", parity)):
        result = magrpo.train(config)
    store = TraceStore(tmp_path / "traces.sqlite")
    solo_episodes, team_episodes = store.episodes(team="cooperate-solver-alone"), store.episodes(team="cooperate")
    assert len(solo_episodes) == 1 and len(team_episodes) == 3, "step 1: two team questions; step 2: one and one"
    assert {c.version for c in store.calls(episode_id=solo_episodes[0].episode_id)} == {"solver-step-1"}
    assert not any("reward/correct_solo" in row for row in result.history if row.get("step") == 1)
    store.close()
