"""The strict answer rule (what trains and what the headline reports) and the instructions agents see.

Issue 10: a completion cut at the token limit ("The sum of 31 and 4") must not be credited with the
last number it happens to contain, a failed checker is recorded with its reason, and no built-in
instruction shows a plausible answer (small models copy it).
"""

from __future__ import annotations

import re

import pytest

from mlpo_agents.rewards import REWARD_FAILED, answer_prompt, extract_answer, score, score_detail
from mlpo_agents.tasks import Task

SUM = Task("t/sum", "What is 31 + 4?", "35", "math", {})
FOUR = Task("t/four", "What is 2 + 2?", "4", "math", {})


@pytest.mark.parametrize(
    ("text", "strict"),
    [
        ("Let me add. <answer>35</answer>", "35"),
        ("31 + 4 = 35, so \\boxed{35}.", "35"),
        ("31 + 4 = 35.\nThe final answer is 35.", "35"),
        ("31 + 4 = 35.\nThe final answer is 35. I hope it is correct.", "35"),
        ("31 + 4 = 35\nAnswer: 35", "35"),
        ("The answer is 3.5.", "3.5"),
        ("The sum of 31 and 4", None),  # no answer given: the old "last number" rule credited 4
        ("31 + 4 = 35", None),
        ("The final answer is 35.\nWait, let me check 31 + 4 again", None),  # the phrase is not at the end
        ("<answer>35", None),  # an unclosed block is not an answer
    ],
)
def test_strict_rule(text: str, strict: str | None) -> None:
    assert extract_answer(text) == strict


def test_truncated_completions_need_a_closed_answer() -> None:
    # Cut at the token limit, "The final answer is 3" may be the first digit of "35".
    assert extract_answer("The final answer is 3", truncated=True) is None
    assert score(SUM, "The final answer is 35", truncated=True) == 0.0
    assert score(SUM, "<answer>35</answer> and then I ramble", truncated=True) == 1.0
    assert score(FOUR, "The sum of 31 and 4") == 0.0
    assert score_detail(FOUR, "The sum of 31 and 4").reason == "no_answer"
    assert score_detail(FOUR, "The sum of 31 and 4", lenient=True).value == 1.0  # why strict is the rule


def test_a_failed_checker_is_recorded_not_a_silent_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlpo_agents.rewards as rewards

    def broken(gold: str, predicted: str, **_: object) -> bool:
        raise RuntimeError("sympy exploded")

    monkeypatch.setattr(rewards, "math_equal", broken)
    result = score_detail(SUM, "<answer>\\frac{70}{2}</answer>")
    assert result.failed and result.value == 0.0
    assert result.reason.startswith(REWARD_FAILED) and "sympy exploded" in result.reason

    monkeypatch.setattr(rewards, "math_equal", lambda *a, **k: None)  # None = timed out
    timed_out = score_detail(SUM, "<answer>\\frac{70}{2}</answer>")
    assert timed_out.failed and "timed out" in timed_out.reason


def test_a_wrong_answer_is_not_a_failure() -> None:
    result = score_detail(SUM, "<answer>36</answer>")
    assert result.reason == "wrong" and not result.failed


BUILTIN_TASKS = [
    Task("m", "q", "1", "math", {}),
    Task("c", "q", "B", "choice", {"options": {"A": "x", "B": "y"}}),
    *[
        Task(f"e{how}", "q", "True", "exact", {"match": how})
        for how in ("choice", "label", "number", "dyck", "words", "text")
    ],
    Task("code", "q", "", "code", {"entry_point": "f"}),
]


@pytest.mark.parametrize("task", BUILTIN_TASKS, ids=lambda t: t.id)
def test_no_instruction_carries_an_answer(task: Task) -> None:
    """An instruction must not show a number or option letter a task could have as its answer."""
    text = answer_prompt(task)
    assert not re.search(r"\d", text), text
    assert not re.search(r"<answer>\s*\S[^<]*</answer>", text), text  # only the empty tags are shown
    assert not re.search(r"\(\s*[A-E]\s*\)|\b[A-E]\b(?![a-z])", text.replace("Python", "")), text


def test_the_graphs_default_instruction_carries_no_answer() -> None:
    from mlpo_agents.graphs.state import TeamContext

    default = TeamContext.__dataclass_fields__["instruction"].default
    assert isinstance(default, str) and not re.search(r"\d", default)


def test_the_runner_records_strict_and_lenient_team_rewards_with_their_reasons(tmp_path) -> None:
    """A leader that never states an answer scores 0 (strict, reason no_answer); the lenient figure is
    recorded beside it under its own name, and the call-level reward trainers read is the strict one."""
    import asyncio

    from mlpo_agents.runner import run_team
    from mlpo_agents.testing import ScriptedModel, scripted_team
    from mlpo_agents.trace import TraceStore

    leader = ScriptedModel("rule-leader", "The sum of 31 and 4")
    team = scripted_team({"leader": leader}, params={"peers": 0})
    store = TraceStore(tmp_path / "t.sqlite")
    summary = asyncio.run(run_team(team, [FOUR], store, task_name="unit", progress=False))
    assert summary.accuracy == 0.0 and summary.lenient_accuracy == 1.0
    by_name = {(r.name, r.call_id is None): r for r in store.rewards()}
    assert by_name["correct", True].value == 0.0 and by_name["correct", True].meta["reason"] == "no_answer"
    assert by_name["correct_lenient", True].value == 1.0
    assert by_name["correct", False].value == 0.0  # the call-level reward: strict
