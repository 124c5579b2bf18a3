"""MAGRPO: joint actions and advantages on hand-built traces, tree returns with early termination, the
cooperate topology against scripted models, and a few real steps on the tiny model."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
import torch

from mlpo_agents.graphs import build_topology
from mlpo_agents.runner import run_team
from mlpo_agents.tasks.base import Task
from mlpo_agents.testing import ScriptedModel, scripted_team
from mlpo_agents.trace import ModelCall, Reward, TraceStore
from mlpo_agents.trainers.losses import discounted_returns
from mlpo_agents.trainers.magrpo import MAGRPOConfig, agent_batches, joint_actions, joint_returns

AGENTS = ("drafter", "solver")
TASK = Task(id="t/0", question="What is 2+2?", answer="4", kind="math", meta={})


def call(call_id, role, *, group, index=0, parent=None, round=0, episode="e1", completion=(5, 6)):
    """A token-exact call with prompt [1, 2, 3] and logprob -0.5 per completion token."""
    return ModelCall(
        call_id=call_id,
        episode_id=episode,
        node=role,
        role=role,
        agent=role,
        round=round,
        group_id=group,
        sample_index=index,
        messages=[],
        text="",
        prompt_token_ids=[1, 2, 3],
        completion_token_ids=list(completion),
        logprobs=[-0.5] * len(completion),
        finish_reason="stop",
        model="local/tiny-test",
        base_model="tiny",
        version="base",
        parent_call_id=parent,
    )


def correct(call_id, value, episode="e1"):
    return Reward(episode, "correct", value, call_id=call_id)


def batches_of(calls, rewards, gamma=0.9, threshold=None):
    actions, skipped = joint_actions(
        calls,
        rewards,
        agents=AGENTS,
        answer_role="solver",
        reward_weights={"correct": 1.0},
        threshold=threshold,
    )
    joint_returns(actions, gamma)
    batches, missing = agent_batches(actions, agents=AGENTS, base_models=dict.fromkeys(AGENTS, "tiny"))
    return actions, batches, missing, skipped


# ------------------------------------------------------------------------------------------- pure parts


def test_aligned_joint_actions_pair_the_ith_draft_with_its_answer_and_share_the_joint_advantage():
    # Three drafts in one group (one call, n=3); each answer is its own call reading draft i.
    calls = [call(f"d{i}", "drafter", group="gd", index=i) for i in range(3)]
    calls += [
        call(f"s{i}", "solver", group=f"gs{i}", parent=f"d{i}") for i in (2, 0, 1)
    ]  # recorded out of order
    rewards = [correct("s0", 1.0), correct("s1", 0.0), correct("s2", 0.0), Reward("e1", "correct", 1.0)]
    actions, batches, missing, skipped = batches_of(calls, rewards)

    assert [[c.call_id for c in a.calls] for a in actions] == [["d0", "s0"], ["d1", "s1"], ["d2", "s2"]]
    assert [a.group for a in actions] == ["gd"] * 3 and [a.reward for a in actions] == [1.0, 0.0, 0.0]
    assert missing == {} and skipped == {"no_reward": 0, "after_termination": 0}
    # R = (1, 0, 0), mean 1/3: A = (2/3, -1/3, -1/3) for *both* agents, row g of each is joint action g.
    expected = torch.tensor([2 / 3, -1 / 3, -1 / 3])
    for role in AGENTS:
        b = batches[role]
        assert b.call_ids == [f"{role[0]}{i}" for i in range(3)]
        assert b.group_ids == ["gd"] and b.group_index.tolist() == [0, 0, 0]
        torch.testing.assert_close(b.rewards, torch.tensor([1.0, 0.0, 0.0]))
        torch.testing.assert_close(b.advantages, expected)
        assert b.input_ids[0].tolist() == [1, 2, 3, 5, 6] and b.completion_mask[0].tolist() == [0, 0, 0, 1, 1]


def test_cross_joint_actions_give_each_draft_the_mean_advantage_of_its_answers():
    # Two drafts x two answers each (solver n=2 per draft): four joint actions in group "gd".
    calls = [call("d0", "drafter", group="gd", index=0), call("d1", "drafter", group="gd", index=1)]
    calls += [
        call(f"s{i}{j}", "solver", group=f"gs{i}", index=j, parent=f"d{i}")
        for i in range(2)
        for j in range(2)
    ]
    values = {"s00": 1.0, "s01": 0.0, "s10": 0.0, "s11": 0.0}
    _, batches, _, _ = batches_of(calls, [correct(k, v) for k, v in values.items()])

    # Joint A_ij = R_ij - 1/4; the solver trains each answer with it, the drafter each draft with the
    # mean over its answers: d0 (1 + 0)/2 - 1/4 = 1/4, d1 0 - 1/4.
    assert batches["solver"].call_ids == ["s00", "s01", "s10", "s11"]
    torch.testing.assert_close(batches["solver"].advantages, torch.tensor([0.75, -0.25, -0.25, -0.25]))
    assert batches["drafter"].call_ids == ["d0", "d1"]
    torch.testing.assert_close(batches["drafter"].advantages, torch.tensor([0.25, -0.25]))


def test_multi_turn_returns_discount_the_childrens_mean_and_terminate_whole_nodes():
    # Turn 0 node g0: a0 = (d0, s0) correct, a1 = (d1, s1) wrong: mean 0.5. Each branches into a turn-1 node:
    # a0 -> g2 = {u0: 1}, a1 -> g1 = {t0: 0, t1: 1}.
    calls = [
        call("d0", "drafter", group="g0", index=0),
        call("d1", "drafter", group="g0", index=1),
        call("s0", "solver", group="x0", parent="d0"),
        call("s1", "solver", group="x1", parent="d1"),
        call("e0", "drafter", group="g1", index=0, parent="s1", round=1),
        call("e1", "drafter", group="g1", index=1, parent="s1", round=1),
        call("t0", "solver", group="y0", parent="e0", round=1),
        call("t1", "solver", group="y1", parent="e1", round=1),
        call("c0", "drafter", group="g2", parent="s0", round=1),
        call("u0", "solver", group="z0", parent="c0", round=1),
    ]
    rewards = [
        correct("s0", 1.0),
        correct("s1", 0.0),
        correct("t0", 0.0),
        correct("t1", 1.0),
        correct("u0", 1.0),
    ]

    # No termination (CoMLRL with termination_threshold=None, or mean 0.5 <= threshold): every joint action
    # bootstraps from the node that branched from it. a0 = 1 + 0.9 * 1 = 1.9, a1 = 0 + 0.9 * 0.5 = 0.45.
    for threshold in (None, 0.5):
        actions, batches, _, skipped = batches_of(calls, rewards, gamma=0.9, threshold=threshold)
        assert {a.key: a.value for a in actions} == pytest.approx(
            {"s0": 1.9, "s1": 0.45, "t0": 0.0, "t1": 1.0, "u0": 1.0}
        )
        assert skipped["after_termination"] == 0
        adv = dict(zip(batches["solver"].call_ids, batches["solver"].advantages.tolist(), strict=True))
        assert adv == pytest.approx({"s0": 0.725, "s1": -0.725, "t0": -0.5, "t1": 0.5})

    # threshold 0.4 < 0.5: the whole root node terminates (strict >), both of its branches are dropped.
    actions, batches, _, skipped = batches_of(calls, rewards, gamma=0.9, threshold=0.4)
    assert {a.key: (a.value, a.done) for a in actions} == {"s0": (1.0, True), "s1": (0.0, True)}
    assert skipped["after_termination"] == 3
    torch.testing.assert_close(batches["solver"].advantages, torch.tensor([0.5, -0.5]))
    # discounted_returns' done mask (used per node by joint_returns): nothing flows back across a done turn.
    path = discounted_returns(torch.tensor([[0.0, 1.0, 5.0]]), 0.9, torch.tensor([[False, True, False]]))
    torch.testing.assert_close(path, torch.tensor([[0.9, 1.0, 0.0]]))


# ---- reference: CoMLRL's rule, transcribed ---------------------------------------------------------
# OpenMLRL/CoMLRL comlrl/trainers/reinforce/magrpo.py (MAGRPOTrainer._train_step_returns: build_node,
# compute_returns, post_order_update; _compute_advantages with advantage_mode="mean"), read at commit
# 1665784389b9c0d5a958242180d33f7b422c9991. A node holds the rewards of its joint actions and, unless
# its mean reward exceeds the termination threshold, one child node per joint action.


def comlrl_returns(node, gamma, threshold):
    """Returns of a node's joint actions as CoMLRL computes them (children ignored when the node terminated)."""
    terminated = threshold is not None and sum(node["rewards"]) / len(node["rewards"]) > threshold
    if terminated or not node["children"]:
        return list(node["rewards"])
    out = []
    for r, child in zip(node["rewards"], node["children"], strict=True):
        child_returns = comlrl_returns(child, gamma, threshold)
        out.append(r + gamma * sum(child_returns) / len(child_returns))
    return out


def comlrl_advantages(returns):
    mean = sum(returns) / len(returns)
    return [r - mean for r in returns]


def aligned_tree(root_rewards, child_rewards):
    """Traces of an aligned two-turn tree: root node g0 of G joint actions, child node gc{j} under each."""
    calls, rewards = [], []
    for j, r in enumerate(root_rewards):
        calls += [
            call(f"d{j}", "drafter", group="g0", index=j),
            call(f"s{j}", "solver", group=f"x{j}", parent=f"d{j}"),
        ]
        rewards.append(correct(f"s{j}", r))
        for k, rk in enumerate(child_rewards[j]):
            calls += [
                call(f"e{j}{k}", "drafter", group=f"gc{j}", index=k, parent=f"s{j}", round=1),
                call(f"t{j}{k}", "solver", group=f"y{j}{k}", parent=f"e{j}{k}", round=1),
            ]
            rewards.append(correct(f"t{j}{k}", rk))
    tree = {
        "rewards": list(root_rewards),
        "children": [{"rewards": list(c), "children": []} for c in child_rewards],
    }
    return calls, rewards, tree


@pytest.mark.parametrize("threshold", [None, 0.5, 0.2])
def test_issue_example_root_rewards_0_1_0_match_comlrl(threshold):
    """Issue 16: root rewards [0, 1, 0]; CoMLRL branches every joint action unless the node's mean > threshold."""
    calls, rewards, tree = aligned_tree([0.0, 1.0, 0.0], [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    actions, batches, _, _ = batches_of(calls, rewards, gamma=0.9, threshold=threshold)
    expected = comlrl_advantages(comlrl_returns(tree, 0.9, threshold))
    for role in AGENTS:
        b = batches[role]
        root = [b.call_ids.index(f"{role[0]}{j}") for j in range(3)]
        assert b.advantages[root].tolist() == pytest.approx(expected, abs=1e-6)
    if threshold == 0.2:  # 1/3 > 0.2: the root node stops, returns are the rewards
        assert expected == pytest.approx([-1 / 3, 2 / 3, -1 / 3])
    else:  # the issue's numbers: returns (0.3, 1.9, 0) -> advantages (-.43, 1.17, -.73)
        assert expected == pytest.approx([-0.4333333, 1.1666667, -0.7333333])


def test_random_aligned_and_cross_trees_match_comlrl():
    """Aligned (G = 3, two turns) and cross (2 drafts x 2 answers, one turn) against the transcription."""
    import random

    rng = random.Random(0)
    for _ in range(20):
        root = [float(rng.random() < 0.5) for _ in range(3)]
        kids = [[float(rng.random() < 0.5) for _ in range(3)] for _ in range(3)]
        threshold = rng.choice([None, 0.3, 0.6])
        calls, rewards, tree = aligned_tree(root, kids)
        actions, batches, _, _ = batches_of(calls, rewards, gamma=0.9, threshold=threshold)
        returns = comlrl_returns(tree, 0.9, threshold)
        assert [a.value for a in actions if a.turn == 0] == pytest.approx(returns)
        if len(set(returns)) > 1:
            b = batches["solver"]
            root_rows = [b.call_ids.index(f"s{j}") for j in range(3)]
            assert b.advantages[root_rows].tolist() == pytest.approx(comlrl_advantages(returns), abs=1e-6)

    # Cross: CoMLRL trains draft i with the *sum* of the joint returns it is part of (post_order_update),
    # ours with their mean, so the drafter's advantages are CoMLRL's divided by G = 2.
    values = {"s00": 1.0, "s01": 0.0, "s10": 1.0, "s11": 1.0}
    calls = [call("d0", "drafter", group="gd", index=0), call("d1", "drafter", group="gd", index=1)]
    calls += [call(k, "solver", group=f"gs{k[1]}", index=int(k[2]), parent=f"d{k[1]}") for k in values]
    _, batches, _, _ = batches_of(calls, [correct(k, v) for k, v in values.items()])
    sums = [values["s00"] + values["s01"], values["s10"] + values["s11"]]
    torch.testing.assert_close(
        batches["drafter"].advantages * 2, torch.tensor(comlrl_advantages(sums)), rtol=0, atol=1e-6
    )
    joint = list(values.values())
    torch.testing.assert_close(batches["solver"].advantages, torch.tensor(comlrl_advantages(joint)))


def test_answers_without_a_reward_are_counted_and_a_degenerate_agent_is_reported():
    calls = [
        call("d0", "drafter", group="gd", index=0),
        call("d1", "drafter", group="gd", index=1),
        call("s0", "solver", group="a", parent="d0"),
        call("s1", "solver", group="b", parent="d1"),
    ]
    actions, batches, missing, skipped = batches_of(calls, [correct("s0", 1.0)])
    assert skipped == {"no_reward": 1, "after_termination": 0} and len(actions) == 1
    assert batches == {} and set(missing) == set(AGENTS) and "single usable sample" in missing["solver"]


def test_config_is_validated():
    with pytest.raises(ValueError, match="G >= 2"):
        MAGRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="on-policy"):
        MAGRPOConfig(offline=True)
    with pytest.raises(ValueError, match="joint_mode"):
        MAGRPOConfig(joint_mode="product")
    with pytest.raises(ValueError, match="answer_role"):
        MAGRPOConfig(answer_role="judge")
    with pytest.raises(ValueError, match="gamma"):
        MAGRPOConfig(gamma=1.5)


# ------------------------------------------------------------------------------------------- topology


def cooperate_run(tmp_path, name, solver_reply, **params):
    drafts = itertools.count()
    drafter = ScriptedModel(f"{name}-d", lambda m: f"plan {next(drafts)}")
    solver = ScriptedModel(f"{name}-s", solver_reply)
    team = scripted_team(
        {"drafter": drafter, "solver": solver},
        topology="cooperate",
        params=params,
        name=name,
        trainable=AGENTS,
    )
    store = TraceStore(tmp_path / f"{name}.sqlite")
    (result,) = asyncio.run(run_team(team, [TASK], store, task_name="unit", progress=False)).results
    return result, store, drafter, solver


def test_cooperate_aligns_answers_with_drafts_and_branches_only_unfinished_joint_actions(tmp_path):
    # The answer to "plan 0" is right; every other answer is wrong.
    def solve(messages):
        return "<answer>4</answer>" if "plan 0\n" in messages[-1]["content"] else "<answer>5</answer>"

    result, store, drafter, solver = cooperate_run(tmp_path, "co1", solve, samples=2, turns=2)
    calls = store.calls(episode_id=result.episode_id)
    by_id = {c.call_id: c for c in calls}
    turn0 = [c for c in calls if c.round == 0]
    assert [(c.role, c.sample_index) for c in turn0] == [
        ("drafter", 0),
        ("drafter", 1),
        ("solver", 0),
        ("solver", 0),
    ]
    for answer in (c for c in turn0 if c.role == "solver"):  # answer g reads draft g
        assert by_id[answer.parent_call_id].text in answer.messages[-1]["content"]
    # Only the wrong joint action (plan 1) branches: two new drafts, both built on its answer.
    turn1_drafts = [c for c in calls if c.round == 1 and c.role == "drafter"]
    wrong = next(c for c in turn0 if c.role == "solver" and c.text == "<answer>5</answer>")
    assert len(turn1_drafts) == 2 and {c.parent_call_id for c in turn1_drafts} == {wrong.call_id}
    assert "plan 1" in drafter.prompts[-1] and "was not accepted" in drafter.prompts[-1]
    assert result.answer == "4" and result.reward == 1.0  # the main line (sample 0) was right at turn 0
    # The runner's call-level rewards make joint actions with the right returns: 2 at turn 0, 2 at turn 1.
    actions, _ = joint_actions(
        calls,
        store.rewards(episode_id=result.episode_id),
        agents=AGENTS,
        answer_role="solver",
        reward_weights={"correct": 1.0},
    )
    joint_returns(actions, 0.9)
    assert [(a.turn, a.reward, round(a.value, 3)) for a in actions] == [
        (0, 1.0, 1.0),
        (0, 0.0, 0.0),
        (1, 0.0, 0.0),
        (1, 0.0, 0.0),
    ]


def test_cooperate_cross_mode_answers_every_draft_several_times(tmp_path):
    result, store, _, _ = cooperate_run(tmp_path, "co2", "<answer>4</answer>", samples=2, solver_samples=3)
    calls = store.calls(episode_id=result.episode_id)
    answers = [c for c in calls if c.role == "solver"]
    assert len(answers) == 6 and len({c.parent_call_id for c in answers}) == 2


def test_cooperate_mermaid_snapshot_and_bad_parameters():
    snapshot = (Path(__file__).parent / "snapshots" / "cooperate.mmd").read_text()
    assert build_topology("cooperate", samples=2, turns=2).get_graph().draw_mermaid() == snapshot
    for params in ({"samples": 0}, {"solver_samples": 0}, {"turns": 0}):
        with pytest.raises(ValueError, match=next(iter(params))):
            build_topology("cooperate", **params)


# ------------------------------------------------------------------------------------------- training


def parity_reward(task, text):
    """A deterministic reward the random tiny model can earn: the parity of the text's byte sum."""
    return float(sum(text.encode()) % 2)


def train_tiny(out: Path, seed: int = 0):
    from mlpo_agents.trainers.magrpo import train

    config = MAGRPOConfig(
        model="tiny-test",
        steps=2,
        group_size=3,
        questions_per_step=2,
        max_tokens=8,
        micro_batch_size=8,
        lr=1e-2,
        out=str(out),
        seed=seed,
        progress=False,
        save_every=2,
    )
    return train(config)


def lora_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
def test_a_few_tiny_steps_change_every_adapter_and_are_reproducible(tmp_path):
    from mlpo_agents.rewards import RewardResult
    from mlpo_agents.rubric import Rubric, use_rubric

    def parity(task, completion):
        value = parity_reward(task, completion.text)
        return RewardResult(value, completion.text[-20:], "correct" if value else "wrong")

    with use_rubric(Rubric.for_kind("math").replace("correct", parity)):  # the rollouts' rubric
        first = train_tiny(tmp_path / "a")
        second = train_tiny(tmp_path / "b")

    assert first.steps == 2 and set(first.adapters) == set(AGENTS)
    for role in AGENTS:
        assert f"{role}/loss" in first.history[-1] or f"{role}/skipped" in first.history[-1]
        weights = lora_weights(first.adapters[role])
        trained = [w for name, w in weights.items() if "lora_B" in name]
        assert trained and any(w.abs().max() > 0 for w in trained), f"{role}: LoRA B is still zero"
        again = lora_weights(second.adapters[role])
        assert weights.keys() == again.keys()
        for name in weights:
            torch.testing.assert_close(weights[name], again[name], rtol=0, atol=0)
        assert (tmp_path / "a" / "agents" / role / "checkpoints" / "step-000002").is_dir()
    assert [h["reward/mean"] for h in first.history] == [h["reward/mean"] for h in second.history]
