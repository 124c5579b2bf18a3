"""Two cooperating agents with aligned joint actions: a drafter plans, a solver answers from the plan.

Built for MAGRPO (Liu et al. 2025, "LLM Collaboration with Multi-Agent Reinforcement Learning",
arXiv 2508.04652), where both agents are trained from one joint reward per joint action.

Turn 0: the `drafter` samples G drafts of one prompt (`samples` = G, one group id). The `solver`
answers once per draft (`solver_samples` = 1, aligned: joint action g = (draft g, its answer)), or S
times per draft (`solver_samples` = S: the G x S product of drafts and answers, MAGRPO's "cross"
mode for a sequential pair). Every solver call records `parent_call_id` = the draft it reads.

Turn t > 0 (`turns` > 1): each joint action of turn t-1 whose answer scored below `threshold` (the
task's grader, like the test feedback of the paper's code tasks) branches: the drafter sees its
earlier draft, the solver's answer and that it was not accepted, and samples G new drafts (parent =
that solver call); the solver answers each as in turn 0. The grade is the weighted call-level reward
of the episode's rubric (`TeamContext.scorer`; by default the task's `correct`), and the runner records
those same results instead of scoring the answers again. A joint action that reaches the threshold
ends its branch (early termination), so the rollout is a tree of at most G^turns leaves (aligned).
Without a rubric (a free-form question not given one) nothing is scored and every branch continues.

The team's answer follows the main line: joint action 0 at turn 0 (draft sample 0, answer sample
0), then its own sample-0 child while it has one (`answer_lenient`: that answer under the lenient
rule, reported only). `scores` holds every graded solver call.

Trace: drafter and solver calls are node = role = agent, round = turn. A failed draft has no
answer; a failed answer ends its branch (both are in `failures` and the trace).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from mlpo_agents.rubric import rubric_for, turn_completion

from .nodes import agent_node, fan_out_each, find_turn, join, require, turns_of, user
from .state import TeamContext, TeamGraph, TeamState, Turn

ROLES = ("drafter", "solver")


def _merge(left: dict[str, Any], right: dict[str, Any]) -> dict[str, Any]:
    return {**left, **right}


class CooperateState(TeamState, total=False):
    """TeamState plus the joint-action links and the graded answers."""

    links: Annotated[dict[str, str], _merge]
    """call id -> the call it builds on (answer -> draft, later draft -> earlier answer)."""
    scores: Annotated[dict[str, float | None], _merge]
    """solver call id -> its grade (None without a task); below `threshold` the branch continues."""


def drafter_prompt(state: dict[str, Any], agent: str, ctx: TeamContext) -> list[dict[str, Any]]:
    """Turn 0: the question. Later turns: the question, the earlier draft and answer, and the verdict."""
    question = state["question"]
    target = state.get("target")
    if target is None:
        return user(
            f"{question}\n\nYou are the planner of a two-agent team. Write a short step-by-step plan "
            "for solving this problem; a teammate will follow it and give the final answer."
        )
    turns = state.get("turns", [])
    answer = find_turn(turns, target)
    draft = find_turn(turns, state.get("links", {}).get(target))
    verdict = "was not accepted" if state.get("scores", {}).get(target) is not None else "may be wrong"
    return user(
        f"{question}\n\nYour earlier plan:\n{draft['text'].strip() if draft else '(none)'}\n\n"
        f"Your teammate's answer following it:\n{answer['text'].strip() if answer else '(none)'}\n\n"
        f"That answer {verdict}. Write a better step-by-step plan; your teammate will follow it."
    )


def solver_prompt(state: dict[str, Any], agent: str, ctx: TeamContext) -> list[dict[str, Any]]:
    """The question and the draft to follow (the `target` call)."""
    draft = find_turn(state.get("turns", []), state["target"])
    return user(
        f"{state['question']}\n\nYour teammate's plan:\n{draft['text'].strip()}\n\n"
        f"Follow the plan, fix it where it is wrong, and solve the problem. {ctx.instruction}"
    )


def linked_node(role: str, prompt: Any, samples: int | None) -> Any:
    """An agent node building on the `target` call (None at turn 0): parent in the trace and in `links`."""
    inner = agent_node(role, prompt, samples=samples, parent=lambda state, _: state.get("target"))

    async def node(state: dict[str, Any], runtime: Runtime[TeamContext]) -> dict[str, Any]:
        out = await inner(state, runtime)
        target = state.get("target")
        return {**out, "links": {t["call_id"]: target for t in out.get("turns", []) if target is not None}}

    return node


def this_turn(state: dict[str, Any], role: str) -> list[Turn]:
    """Every sample of `role` at the current turn, in the order they were recorded."""
    return turns_of(state.get("turns", []), role=role, round=state.get("round", 0), first_sample_only=False)


def drafts_to_answer(state: dict[str, Any]) -> list[dict[str, Any]]:
    """One solver payload per draft of this turn."""
    return [
        {"agent": "solver", "target": t["call_id"], "round": t["round"]} for t in this_turn(state, "drafter")
    ]


def branches(threshold: float) -> Any:
    """Payloads for the next turn's drafter: one per answer of this turn that scored below `threshold`."""

    def payloads(state: dict[str, Any]) -> list[dict[str, Any]]:
        scores, next_turn = state.get("scores", {}), state.get("round", 0)
        return [
            {"agent": "drafter", "target": t["call_id"], "round": next_turn}
            for t in turns_of(
                state.get("turns", []), role="solver", round=next_turn - 1, first_sample_only=False
            )
            if scores.get(t["call_id"]) is None or scores[t["call_id"]] < threshold
        ]

    return payloads


def first_child(turns: list[Turn], links: dict[str, str], role: str, parent: str | None) -> Turn | None:
    """Sample 0 of `role` built on call `parent` (None: a turn-0 draft)."""
    return next(
        (
            t
            for t in turns
            if t["role"] == role and t["sample_index"] == 0 and links.get(t["call_id"]) == parent
        ),
        None,
    )


def main_line(state: dict[str, Any]) -> Turn | None:
    """The last answer along sample 0: answer 0 of draft 0, then answer 0 of that answer's draft 0, ..."""
    turns, links = state.get("turns", []), state.get("links", {})
    found: Turn | None = None
    while True:
        draft = first_child(turns, links, "drafter", found["call_id"] if found else None)
        answer = first_child(turns, links, "solver", draft["call_id"]) if draft else None
        if answer is None:
            return found
        found = answer


def grade_node(graded: bool) -> Any:
    """A node grading this turn's answers with the rubric (when `graded`), setting the team answer, advancing the turn."""

    async def grade(state: dict[str, Any], runtime: Runtime[TeamContext]) -> dict[str, Any]:
        ctx = runtime.context
        scorer = ctx.scorer
        if scorer is None and ctx.task is not None:  # run outside the runner: the task's rubric
            scorer = rubric_for(ctx.task).scorer(ctx.task)
        answers = this_turn(state, "solver")

        def grades() -> dict[str, float | None]:
            return {
                t["call_id"]: scorer.total(turn_completion(t, state), "call") if graded and scorer else None
                for t in answers
            }

        # A thread, as the runner scores: math-verify and code sandboxes must not block the event loop.
        scores = await asyncio.to_thread(grades)
        line = main_line({**state, "scores": {**state.get("scores", {}), **scores}})
        return {
            "scores": scores,
            "round": state.get("round", 0) + 1,
            "answer": line["answer"] if line else None,
            "answer_lenient": line.get("answer_lenient") if line else None,
        }

    return grade


def next_turn_or_end(turns: int, threshold: float) -> Any:
    """Branch the unfinished joint actions into the next turn, or end after the last turn."""
    to_drafter = fan_out_each("drafter", branches(threshold))

    async def route(state: dict[str, Any]) -> Any:  # async, like the `nodes` building blocks it awaits
        return await to_drafter(state) if state.get("round", 0) < turns else END

    return route


def build_cooperate(
    samples: int = 2,
    solver_samples: int = 1,
    turns: int = 1,
    threshold: float = 1.0,
    grade: bool = True,
    checkpointer: Any = None,
) -> TeamGraph:
    """Drafter → solver with G aligned joint actions per turn, branching for `turns` turns."""
    require(samples >= 1, f"samples={samples}: the drafter needs >= 1 sample per turn (G >= 2 to train)")
    require(solver_samples >= 1, f"solver_samples={solver_samples}: must be >= 1 (1 = aligned joint actions)")
    require(turns >= 1, f"turns={turns}: a cooperation needs at least 1 turn")
    g = StateGraph(CooperateState, context_schema=TeamContext)
    g.add_node("drafter", linked_node("drafter", drafter_prompt, samples))
    g.add_node("drafted", join)
    g.add_node("solver", linked_node("solver", solver_prompt, solver_samples))
    g.add_node("grade", grade_node(grade))
    g.add_edge(START, "drafter")
    g.add_edge("drafter", "drafted")
    g.add_conditional_edges("drafted", fan_out_each("solver", drafts_to_answer, "grade"), ["solver", "grade"])
    g.add_edge("solver", "grade")
    g.add_conditional_edges("grade", next_turn_or_end(turns, threshold), ["drafter", END])
    return g.compile(checkpointer=checkpointer, name="cooperate")
