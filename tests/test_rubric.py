"""Rubrics: weights, user reward functions recorded with their reason, failed checkers, each output scored
once per episode, and the default rubric giving exactly the rewards the runner recorded before rubrics."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest

from mlpo_agents import Team
from mlpo_agents.graphs.nodes import make_turn
from mlpo_agents.models import ModelClient
from mlpo_agents.rewards import REWARD_FAILED, RewardResult, TaskKindError, format_reward, score_detail
from mlpo_agents.rubric import Completion, RewardFunc, Rubric, correctness, team_completion, use_rubric
from mlpo_agents.runner import FREE_FORM, reward_event, run_team, score_episode
from mlpo_agents.tasks import load_task
from mlpo_agents.tasks.base import Task
from mlpo_agents.testing import ScriptedModel, scripted_team
from mlpo_agents.trace import Reward, TraceStore

MATH = Task(id="t/0", question="What is 2+2?", answer="4", kind="math", meta={})
CHOICE = Task("c/0", "Which is a fruit?\n(A) car\n(B) apple", "B", "choice", {"options": {"A": "car", "B": "apple"}})
CODE = Task("code/0", "halve", "", "code", {
    "style": "mbpp", "entry_point": "halve", "test_imports": ["import math"],
    "tests": ["assert halve(3) == 1.5", "assert math.isclose(halve(1), 0.5)"],
})


@pytest.fixture
def store(tmp_path):
    s = TraceStore(tmp_path / "traces.sqlite")
    yield s
    s.close()


def says_four(task: Task, completion: Completion) -> RewardResult:
    return RewardResult(float("4" in completion.text), None, "mentions 4" if "4" in completion.text else "no 4")


def run(team, tasks, store, **kw):
    return asyncio.run(run_team(team, tasks, store, task_name="unit", progress=False, **kw))


def solo(reply: Any, name: str, peers: int = 0):
    models = {"leader": ScriptedModel(f"{name}-leader", reply)}
    if peers:
        models["peer"] = ScriptedModel(f"{name}-peer", "I think <answer>5</answer>")
    return scripted_team(models, params={"peers": peers}, name=name)


# ------------------------------------------------------------------------------------------- the rubric itself


def test_weights_make_the_total_and_names_are_checked():
    rubric = Rubric([says_four, RewardFunc("half", lambda t, c: 0.5)], weights=[2.0, 3.0])
    assert rubric.names == ("says_four", "half") and rubric.weights == {"says_four": 2.0, "half": 3.0}
    results = rubric.score(MATH, Completion("<answer>4</answer>"))
    assert results["says_four"].reason == "mentions 4" and results["half"] == RewardResult(0.5, None, "")
    assert rubric.total(results) == 2.0 * 1.0 + 3.0 * 0.5
    assert Rubric.for_task(MATH).weights == {"correct": 1.0, "correct_lenient": 0.0, "format": 0.0, "answered": 0.0}
    assert Rubric.for_task(MATH).add(says_four, weight=0.5).total({"correct": 1.0, "says_four": 1.0}) == 1.5
    with pytest.raises(ValueError, match="2 weights for 1"):
        Rubric([says_four], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="unique"):
        Rubric([says_four, RewardFunc("says_four", says_four)])
    with pytest.raises(ValueError, match="name the reward function"):
        Rubric([lambda t, c: 1.0])
    with pytest.raises(KeyError, match="no reward 'judge'"):
        Rubric.for_task(MATH).replace("judge", says_four)
    with pytest.raises(TaskKindError):
        Rubric.for_kind("essay")
    assert Rubric.for_kind(FREE_FORM).funcs == ()


def test_a_failing_checker_is_a_failed_reward_not_a_zero_and_misuse_raises():
    def broken(task, completion):
        raise RuntimeError("judge is down")

    (result,) = Rubric([broken]).score(MATH, Completion("x")).values()
    assert result.failed and result.value == 0.0 and "judge is down" in result.reason
    assert result.reason.startswith(REWARD_FAILED)
    (nan,) = Rubric([RewardFunc("nan", lambda t, c: float("nan"))]).score(MATH, Completion("x")).values()
    assert nan.failed
    with pytest.raises(TypeError, match="returned str"):
        Rubric([RewardFunc("text", lambda t, c: "good")]).score(MATH, Completion("x"))


# ------------------------------------------------------------------------------------------- in a run


def test_a_user_reward_and_a_failing_one_are_recorded_with_name_value_and_reason(store):
    def broken(task, completion):
        raise RuntimeError("judge is down")

    rubric = Rubric.for_task(MATH).add(says_four, weight=0.5).add(broken, weight=0.0)
    (result,) = run(solo("<answer>4</answer>", "custom"), [MATH], store, rubric=rubric).results
    assert result.reward == 1.5 and result.rewards == {"correct": 1.0, "correct_lenient": 1.0, "says_four": 1.0,
                                                      "broken": 0.0}
    by_key = {(r.name, r.call_id is None): r for r in store.rewards()}
    for team_level in (True, False):
        mine = by_key[("says_four", team_level)]
        assert (mine.value, mine.meta) == (1.0, {"reason": "mentions 4"})
        failed = by_key[("broken", team_level)]
        assert failed.value == 0.0 and failed.meta["failed"] is True
        assert failed.meta["reason"] == f"{REWARD_FAILED} RuntimeError: judge is down"
    assert by_key[("correct", True)].meta == {"reason": "correct", "extracted": "4"}


def test_an_llm_judge_calling_a_model_client_is_one_more_entry(store):
    judge_team = scripted_team({"judge": ScriptedModel("rubric-judge", lambda m: "8/10")}, name="judge")
    judge = ModelClient(judge_team, store)

    async def llm_judge(task, completion):
        prompt = f"Question: {task.question}\nReply: {completion.text}\nRate the reply as N/10."
        (sample,) = await judge.acomplete([{"role": "user", "content": prompt}], role="judge",
                                          node="rubric", episode_id=completion.episode_id)
        return RewardResult(int(sample.text.split("/")[0]) / 10, None, f"the judge said {sample.text}")

    team = Team.load(solo("<answer>4</answer>", "judged"), traces=store,
                     rubric=Rubric.for_task(MATH).add(llm_judge, weight=0.0))
    result = team.invoke(task=MATH)
    assert result.reward == 1.0 and result.rewards["llm_judge"] == 0.8
    (episode_reward,) = [r for r in store.rewards(name="llm_judge") if r.call_id is None]
    assert episode_reward.meta["reason"] == "the judge said 8/10"
    judged = store.calls(role="judge")
    assert len(judged) == 1 and judged[0].episode_id == result.episode_id  # the leader's output, judged once
    free = team.invoke("What is 2+2?", rubric=Rubric([says_four]))  # a free-form question, scored by request
    assert free.reward == 1.0 and [r.name for r in store.rewards(episode_id=free.episode_id)] == ["says_four"] * 2


def test_the_leader_answer_is_scored_once(store):
    seen: Counter[str] = Counter()

    def counting(task, completion):
        seen[completion.text] += 1
        return correctness(task, completion)

    rubric = Rubric.for_task(MATH).replace("correct", counting)
    (result,) = run(solo("Adding: <answer>4</answer>", "once", peers=2), [MATH], store, rubric=rubric).results
    assert seen == {"Adding: <answer>4</answer>": 1}  # team answer and leader call share one score
    correct = [r for r in store.rewards(name="correct")]
    assert sorted(r.call_id is None for r in correct) == [False, True] and {r.value for r in correct} == {1.0}
    assert result.reward == 1.0


def test_use_rubric_scores_runs_that_are_given_none(store):
    with use_rubric(Rubric([says_four])):
        (result,) = run(solo("<answer>5</answer>", "scoped"), [MATH], store).results
        answer = Team.load(solo("<answer>5</answer>", "scoped-free"), traces=store).invoke("2+2?")
    assert result.rewards == {"says_four": 0.0} and answer.reward is None  # free-form: not by the scope
    (plain,) = run(solo("<answer>5</answer>", "scoped2"), [MATH], store).results
    assert plain.rewards == {"correct": 0.0, "correct_lenient": 0.0}


def test_cooperate_grades_with_the_rubric_and_the_runner_reuses_those_grades(store):
    seen: Counter[str] = Counter()

    def plan_zero(task, completion):  # the answer following "plan 0" is the accepted one
        seen[completion.text] += 1
        return 1.0 if "plan 0" in completion.text else 0.0

    drafts = iter(range(100))
    team = scripted_team(
        {"drafter": ScriptedModel("rub-d", lambda m: f"plan {next(drafts)}"),
         "solver": ScriptedModel("rub-s", lambda m: f"<answer>for {m[-1]['content'].split('plan:')[1][1:7]}</answer>")},
        topology="cooperate", params={"samples": 2, "turns": 2}, name="rub-co", trainable=("drafter", "solver"),
    )
    (result,) = run(team, [MATH], store, rubric=Rubric([RewardFunc("correct", plan_zero)])).results
    solver = [c for c in store.calls(episode_id=result.episode_id) if c.role == "solver"]
    assert len(solver) == 4  # plan 1 scored 0 and branched into two more drafts: the rubric graded
    assert set(seen.values()) == {1}  # each answer scored once, in the graph; the runner reused it
    correct = {r.call_id: r.value for r in store.rewards(name="correct")}
    assert sorted(correct[c.call_id] for c in solver) == [0.0, 0.0, 0.0, 1.0] and result.reward == 1.0


# ------------------------------------------------------------------------------------------- same as before


def legacy_score_episode(task, state, episode_id, score_roles):
    """The runner's `score_episode` before rubrics (verbatim but for one change: code records no
    `correct_lenient`, a program having no lenient reading), the reference for the default rubric."""

    def score_answer(task, answer):
        if answer is None:
            return RewardResult(0.0, None, "no_answer")
        return score_detail(task, f"<answer>{answer}</answer>")

    events = [reward_event(episode_id, "correct", score_answer(task, state.get("answer")))]
    if "answer_lenient" in state and task.kind != "code":
        events.append(reward_event(episode_id, "correct_lenient", score_answer(task, state["answer_lenient"])))
    for turn in state.get("turns", []):
        if turn["role"] in score_roles:
            result = score_detail(task, turn["text"], truncated=turn.get("truncated", False))
            events.append(reward_event(episode_id, "correct", result, call_id=turn["call_id"]))
            events.append(Reward(episode_id, "format", format_reward(turn["text"]), call_id=turn["call_id"]))
            answered = 0.0 if result.reason == "no_answer" or result.failed else 1.0
            events.append(Reward(episode_id, "answered", answered, call_id=turn["call_id"]))
    return events


def leader_state(text: str, truncated: bool = False) -> dict[str, Any]:
    """A leader_peers-like final state: a peer turn, then the leader's turn giving the team answer."""
    turns = [
        make_turn(SimpleNamespace(text=t, finish_reason="length" if cut else "stop", call_id=f"c{i}",
                                  group_id=f"g{i}", sample_index=0), role, role, 0)
        for i, (t, cut, role) in enumerate([("peer says <answer>7</answer>", False, "peer"), (text, truncated, "leader")])
    ]
    return {"question": "q", "turns": turns, "answer": turns[-1]["answer"], "answer_lenient": turns[-1]["answer_lenient"]}


def outputs_for(task: Task) -> list[tuple[str, bool]]:
    if task.kind == "code":
        good = "def halve(x):\n    return x / 2\n"
        return [
            (f"<answer>{good}</answer>", False),
            (f"<answer>\n```python\n{good}```\n</answer>", False),
            (f"Here:\n```python\n{good}```", False),  # a program for the call (team answer: see below)
            ("<answer> def halve(x): return x / 2</answer>", False),  # indented: the call's program fails
            ("<answer>def halve(x):\n    return x / 3\n</answer>", False),
            ("<answer>def halve(x:\n</answer>", False),
            ("I cannot write it.", False),
        ]
    gold = task.answer
    wrong = "A" if task.kind == "choice" else str(int(gold) + 1)
    return [
        (f"<answer>{gold}</answer>", False),
        (f"<answer> {wrong} </answer>", False),
        (f"Step 1.\nThe final answer is {gold}.", False),
        (f"The final answer is {gold}", True),
        (f"so \\boxed{{{gold}}} <answer>", False),
        (f"I think it is {gold}", False),
        (f"<answer>{wrong}</answer><answer>{gold}</answer>", False),
        ("<answer>  </answer>", False),
        (f"<answer>{gold}", True),
    ]


def comparable(events: list[Reward]) -> list[tuple[Any, ...]]:
    return [(e.name, e.value, e.call_id, e.meta) for e in events]


@pytest.mark.parametrize("kind", ["word_problems", "choice", "code"])
def test_the_default_rubric_records_exactly_the_rewards_of_before(kind):
    tasks = load_task("word_problems", split="test", limit=2) if kind == "word_problems" else [
        CHOICE if kind == "choice" else CODE]
    for task in tasks:
        for text, truncated in outputs_for(task):
            state = leader_state(text, truncated)
            for roles in (("leader",),) if task.kind == "code" else (("leader",), ("leader", "peer"), ()):
                new = score_episode(task, state, "e", roles)
                old = legacy_score_episode(task, state, "e", roles)
                assert comparable(new) == comparable(old), (task.id, text, roles)


def test_a_program_is_run_once_when_the_team_answer_is_the_leaders():
    runs: list[str] = []

    def counting(task, completion):
        runs.append(completion.text)
        return Rubric.for_task(CODE).funcs[0].fn(task, completion)

    rubric = Rubric.for_task(CODE).replace("correct", counting)
    code = "<answer>def halve(x):\n    return x / 2\n</answer>"
    assert team_completion(CODE, leader_state(code), ("leader",)).text == code
    assert len(score_episode(CODE, leader_state(code), "e", ("leader",), rubric)) == 4 and runs == [code]
    runs.clear()  # a leading space: the team's program differs from the call's, so both are run
    spaced = "<answer> def halve(x): return x / 2</answer>"
    events = score_episode(CODE, leader_state(spaced), "e", ("leader",), rubric)
    assert len(runs) == 2 and [e.value for e in events if e.name == "correct"] == [1.0, 0.0]


def test_on_a_code_task_a_fenced_program_is_the_team_answer_and_scores_as_its_call(store):
    """The leader's program in a Markdown fence (no <answer> block) is what its call's reward runs; the team's
    answer is that same program, so the episode is not scored "no answer" while its call passes."""
    reply = "Here it is:\n```python\ndef halve(x):\n    return x / 2\n```\nIt divides by two."
    program = "def halve(x):\n    return x / 2\n"
    fenced = make_turn(SimpleNamespace(text=reply, finish_reason="stop", call_id="c", group_id="g", sample_index=0),
                       "leader", "leader", 0, code=True)
    assert fenced["answer"] == fenced["answer_lenient"] == program
    (result,) = run(solo(reply, "fenced"), [CODE], store).results
    assert result.answer == program and result.reward == 1.0
    rewards = {(r.name, r.call_id is None): r.value for r in store.rewards()}
    assert rewards[("correct", True)] == rewards[("correct", False)] == 1.0
    assert ("correct_lenient", True) not in rewards
