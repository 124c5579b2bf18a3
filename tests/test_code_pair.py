"""The code_pair topology (MAGRPO's code setting): a helper writes `aux`, the main agent the entry point;
their joint program is scored by the task's tests in the sandbox, and MAGRPO trains both from it."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
import torch

import mlpo_agents.rewards as rewards
from mlpo_agents.config import ConfigError
from mlpo_agents.graphs import build_topology
from mlpo_agents.graphs.code_pair import joint_program
from mlpo_agents.graphs.nodes import question_seed
from mlpo_agents.runner import run_team
from mlpo_agents.tasks.base import Task
from mlpo_agents.testing import ScriptedModel, scripted_team
from mlpo_agents.trace import TraceStore
from mlpo_agents.trainers.magrpo import (
    MAGRPOConfig,
    agent_batches,
    for_team,
    graph_params,
    joint_actions,
    joint_returns,
)

AGENTS = ("helper", "main")
MBPP = Task(
    id="pair/mbpp/0",
    question="Write a function double_all that doubles every number of a list.\n"
    "Your code should pass these tests:\n\nassert double_all([1, 2]) == [2, 4]",
    answer="",
    kind="code",
    meta={
        "style": "mbpp",
        "entry_point": "double_all",
        "tests": ["assert double_all([1, 2]) == [2, 4]", "assert double_all([]) == []"],
        "test_imports": [],
    },
)
HUMANEVAL_PROMPT = 'def double_all(xs: list) -> list:\n    """Double every number of xs."""\n'
HUMANEVAL = Task(
    id="pair/humaneval/0",
    question=HUMANEVAL_PROMPT,
    answer="",
    kind="code",
    meta={
        "style": "humaneval",
        "entry_point": "double_all",
        "prompt": HUMANEVAL_PROMPT,
        "tests": "def check(candidate):\n    assert candidate([1, 2]) == [2, 4]\n    assert candidate([]) == []\n",
    },
)
HELPER_CODE = "def aux(x):\n    return x * 2\n"
BROKEN_HELPER_CODE = "def aux(x):\n    return x * 3\n"
MAIN_CODE = "def double_all(xs):\n    return [aux(x) for x in xs]\n"


def answer(code: str) -> str:
    return f"Here it is.\n<answer>\n{code}</answer>"


def pair_run(tmp_path, name, helper_reply, main_reply, task=MBPP, seed=None, **params):
    helper = ScriptedModel(f"{name}-h", helper_reply)
    main = ScriptedModel(f"{name}-m", main_reply)
    team = scripted_team(
        {"helper": helper, "main": main}, topology="code_pair", params=params, name=name, trainable=AGENTS
    )
    if seed is not None:
        for role in team.roles.values():
            role.sampling.seed = seed
    store = TraceStore(tmp_path / f"{name}.sqlite")
    (result,) = asyncio.run(run_team(team, [task], store, task_name="unit", progress=False)).results
    return result, store, helper, main


def main_rewards(store, result):
    calls = store.calls(episode_id=result.episode_id, role="main")
    table = {r.call_id: r.value for r in store.rewards(episode_id=result.episode_id) if r.name == "correct"}
    return [table[c.call_id] for c in calls]


@pytest.fixture
def programs(monkeypatch):
    """The programs the sandbox is asked to run (each still run for real)."""
    seen = []
    real = rewards.run_tests

    def spy(program, **kwargs):
        seen.append(program)
        return real(program, **kwargs)

    monkeypatch.setattr(rewards, "run_tests", spy)
    return seen


# ------------------------------------------------------------------------------------------- topology


@pytest.mark.parametrize("task", [MBPP, HUMANEVAL], ids=["mbpp", "humaneval"])
def test_a_right_pair_passes_the_tests_and_the_sandbox_runs_exactly_helper_then_main(
    tmp_path, programs, task
):
    result, store, _, _ = pair_run(
        tmp_path, f"ok-{task.meta['style']}", answer(HELPER_CODE), answer(MAIN_CODE), task=task, samples=2
    )
    assert result.status == "done" and result.reward == 1.0
    assert main_rewards(store, result) == [1.0, 1.0]  # every joint action's reward, on its main call
    assert result.answer == (HELPER_CODE + "\n" + MAIN_CODE).strip() + "\n"  # as extract_code reads a program
    prefix = "\n" if task.meta["style"] == "mbpp" else HUMANEVAL_PROMPT + "\n"  # build_program's own prefix
    joint = [p for p in programs if "return [aux(x)" in p.solution]
    assert joint and {p.solution for p in joint} == {prefix + HELPER_CODE + "\n" + MAIN_CODE}
    # The trace keeps each call's own output; only the state's main turn holds the joint program.
    calls = store.calls(episode_id=result.episode_id)
    assert {c.text for c in calls if c.role == "main"} == {answer(MAIN_CODE)}
    assert {c.text for c in calls if c.role == "helper"} == {answer(HELPER_CODE)}


def test_a_broken_helper_fails_the_joint_program(tmp_path, programs):
    result, store, _, _ = pair_run(
        tmp_path, "broken", answer(BROKEN_HELPER_CODE), answer(MAIN_CODE), samples=2
    )
    assert result.status == "done" and result.reward == 0.0
    assert main_rewards(store, result) == [0.0, 0.0]
    assert any(p.solution == "\n" + BROKEN_HELPER_CODE + "\n" + MAIN_CODE for p in programs)


def test_main_without_code_has_no_program_and_helper_without_code_leaves_main_alone():
    assert joint_program(answer(HELPER_CODE), "I cannot do it") is None
    assert joint_program("no code", answer(MAIN_CODE)) == MAIN_CODE
    assert joint_program(f"```python\n{HELPER_CODE}```", answer(MAIN_CODE)) == HELPER_CODE + "\n" + MAIN_CODE


def test_each_role_sees_the_task_prompt_and_its_own_job_only(tmp_path):
    result, store, helper, main = pair_run(
        tmp_path, "prompts", answer(HELPER_CODE), answer(MAIN_CODE), samples=3
    )
    calls = store.calls(episode_id=result.episode_id)
    assert len({c.group_id for c in calls if c.role == "helper"}) == 1  # one helper call of n=3
    assert len({c.group_id for c in calls if c.role == "main"}) == 3  # one main call per aux
    assert len(set(helper.prompts)) == 1
    helper_prompt = helper.prompts[0]
    assert helper_prompt.startswith(MBPP.question)
    assert "helper function named `aux`" in helper_prompt and "not `double_all`" in helper_prompt
    # Simultaneous, as CoMLRL: the main agent is told that `aux(...)` exists (its name only), never its code.
    assert len(set(main.prompts)) == 1
    main_prompt = main.prompts[0]
    assert main_prompt.startswith(MBPP.question)
    assert (
        "helper function `aux(...)`" in main_prompt and "Write only the function `double_all`" in main_prompt
    )
    assert "return x * 2" not in main_prompt and "<answer></answer>" in main_prompt


def test_aligned_and_cross_pairs_are_linked_and_seeded_for_distinct_or_shared_samples(tmp_path):
    # Aligned: main call g is paired with aux g and sampled with the question's seed for offset g
    # (graphs.nodes.call_seed: G distinct streams for one prompt).
    result, store, _, _ = pair_run(
        tmp_path, "aligned", answer(HELPER_CODE), answer(MAIN_CODE), samples=3, seed=10
    )
    calls = store.calls(episode_id=result.episode_id)
    helpers = {c.call_id: c for c in calls if c.role == "helper"}
    mains = [c for c in calls if c.role == "main"]
    assert len(mains) == 3 and {c.parent_call_id for c in mains} == set(helpers)
    assert sorted((helpers[c.parent_call_id].sample_index, c.sampling["seed"]) for c in mains) == [
        (g, question_seed(10, "main", MBPP.id, 0, g)) for g in range(3)
    ]
    assert len({c.sampling["seed"] for c in mains}) == 3
    # Cross: S = 2 main samples per aux, all with the question's seed (the same samples for every aux): G x S.
    result, store, _, _ = pair_run(
        tmp_path, "cross", answer(HELPER_CODE), answer(MAIN_CODE), samples=2, main_samples=2, seed=10
    )
    mains = [c for c in store.calls(episode_id=result.episode_id) if c.role == "main"]
    assert len(mains) == 4 and len({c.parent_call_id for c in mains}) == 2
    assert {c.sampling["seed"] for c in mains} == {question_seed(10, "main", MBPP.id)} and {c.sampling["n"] for c in mains} == {2}


def test_joint_actions_give_both_agents_the_joint_advantage(tmp_path):
    # aux 0 is right, aux 1 broken; the same main code: joint rewards (1, 0).
    replies = itertools.cycle([answer(HELPER_CODE), answer(BROKEN_HELPER_CODE)])
    result, store, _, _ = pair_run(tmp_path, "joint", lambda m: next(replies), answer(MAIN_CODE), samples=2)
    calls = store.calls(episode_id=result.episode_id)
    actions, skipped = joint_actions(
        calls,
        store.rewards(episode_id=result.episode_id),
        agents=AGENTS,
        answer_role="main",
        reward_weights={"correct": 1.0},
    )
    joint_returns(actions, 0.9)
    assert skipped == {"no_reward": 0, "after_termination": 0}
    assert [[c.role for c in a.calls] for a in actions] == [["helper", "main"]] * 2
    assert [a.calls[0].sample_index for a in actions] == [0, 1] and [a.reward for a in actions] == [1.0, 0.0]
    batches, missing = agent_batches(actions, agents=AGENTS, base_models=dict.fromkeys(AGENTS, "scripted"))
    assert missing == {}
    for role in AGENTS:
        torch.testing.assert_close(batches[role].advantages, torch.tensor([0.5, -0.5]))


def test_a_non_code_task_stops_the_run_with_the_fix(tmp_path):
    math_task = Task(id="m/0", question="What is 2+2?", answer="4", kind="math", meta={})
    with pytest.raises(ConfigError, match="code task"):
        pair_run(tmp_path, "math", answer(HELPER_CODE), answer(MAIN_CODE), task=math_task)


def test_mermaid_snapshot_and_bad_parameters():
    snapshot = (Path(__file__).parent / "snapshots" / "code_pair.mmd").read_text()
    assert build_topology("code_pair", samples=2).get_graph().draw_mermaid() == snapshot
    for params in ({"samples": 0}, {"main_samples": 0}):
        with pytest.raises(ValueError, match=next(iter(params))):
            build_topology("code_pair", **params)


# ------------------------------------------------------------------------------------------- MAGRPO


def test_magrpo_takes_the_roles_and_fan_out_of_the_team_topology():
    from mlpo_agents.config import load_team

    team = load_team("code_pair")
    config = for_team(MAGRPOConfig(team="code_pair", group_size=3), team)
    assert config.agents == AGENTS and config.answer_role == "main"
    assert graph_params(config, team) == {"samples": 3, "main_samples": 1}
    cross = for_team(MAGRPOConfig(team="code_pair", group_size=3, joint_mode="cross"), team)
    assert graph_params(cross, team) == {"samples": 3, "main_samples": 3}
    assert graph_params(cross, team, evaluation=True) == {"samples": 1, "main_samples": 1}
    with pytest.raises(ValueError, match="one turn"):
        for_team(MAGRPOConfig(team="code_pair", turns=2), team)
    # Roles set explicitly are kept; the cooperate team is unchanged.
    explicit = MAGRPOConfig(team="code_pair", agents=("main", "helper"), answer_role="helper")
    assert for_team(explicit, team).agents == ("main", "helper")
    cooperate = load_team("cooperate")
    assert for_team(MAGRPOConfig(), cooperate).agents == ("drafter", "solver")
    assert graph_params(MAGRPOConfig(group_size=2), cooperate, evaluation=True) == {
        "samples": 1,
        "turns": 1,
        "solver_samples": 1,
        "threshold": float("inf"),
    }


TINY_TEAM = """\
name: tiny_code_pair
topology: code_pair
params: {samples: 1}
model_list:
  - model_name: tiny
    litellm_params: {model: local/tiny-test}
router_settings: {num_retries: 0, timeout: 120}
roles:
  helper: {model: tiny, trainable: true, sampling: {temperature: 0.6, top_p: 0.6, max_tokens: 8}}
  main: {model: tiny, trainable: true, sampling: {temperature: 0.6, top_p: 0.6, max_tokens: 8}}
"""


def test_one_tiny_magrpo_step_on_code_pair(tmp_path, monkeypatch):
    import mlpo_agents.trainers.magrpo as magrpo
    from mlpo_agents.rewards import RewardResult
    from mlpo_agents.rubric import Rubric, use_rubric

    tasks = [MBPP, HUMANEVAL]
    monkeypatch.setattr(magrpo, "load_split", lambda config, split, limit, seed=None: list(tasks[:limit]))
    seen: list[str] = []

    def parity(task, completion):  # the random tiny model writes no code: a reward it can earn instead
        seen.append(completion.role or "")
        value = float(sum(completion.text.encode()) % 2)
        return RewardResult(value, None, "correct" if value else "wrong")

    (tmp_path / "team.yaml").write_text(TINY_TEAM)
    config = MAGRPOConfig(
        team=str(tmp_path / "team.yaml"),
        task="mbpp",
        steps=1,
        group_size=3,
        questions_per_step=2,
        train_questions=2,
        micro_batch_size=8,
        lr=1e-2,
        out=str(tmp_path / "run"),
        progress=False,
    )
    with use_rubric(Rubric.for_kind("code").replace("correct", parity)):
        result = magrpo.train(config)

    assert result.steps == 1 and set(result.adapters) == set(AGENTS)
    last = result.history[-1]
    assert last["joint_actions"] == 2 * 3  # two questions x G aligned pairs
    assert "main" in seen and "helper" in seen
    for role in AGENTS:  # both agents updated from the joint rewards (seeded: deterministic)
        assert f"{role}/loss" in last and last[f"{role}/rows"] == 6
        assert (result.adapters[role] / "adapter_model.safetensors").is_file()
    store = TraceStore(tmp_path / "run" / "traces.sqlite")
    mains = store.calls(role="main")
    for episode in {c.episode_id for c in mains}:  # aligned main calls: seed + g, so G different samples
        assert len({c.text for c in mains if c.episode_id == episode}) > 1
    store.close()
