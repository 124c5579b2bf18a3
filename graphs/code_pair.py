"""Two agents write one program: a helper writes `aux`, the main agent writes the task's entry point.

MAGRPO's own setting (Liu et al. 2025, "LLM Collaboration with Multi-Agent Reinforcement Learning",
arXiv 2508.04652; reference code OpenMLRL/CoMLRL with its code-generation environment): on a code task
(HumanEval, MBPP) the `helper` writes an auxiliary function named `aux` and the `main` agent writes the
function the tests call (`task.meta["entry_point"]`). The agents act simultaneously: each sees only the
task prompt; the main agent is told that a helper `aux(...)` exists (its name only, as CoMLRL's prompt
does), never the helper's code. The team's program is the helper's code followed by the main code, scored
by the task's unit tests in the sandbox like any code answer (`rewards.extract_code`, `build_program`).

Turn 0 (the only turn): the helper samples G functions of one prompt (`samples` = G, one group id). The
main agent samples once per helper sample (`main_samples` = 1, aligned: joint action g = (aux g, main
g)) or S times per helper sample (`main_samples` = S: the G x S joint actions of MAGRPO's "cross" mode).
Every main call records `parent_call_id` = the helper call it is paired with (so main calls start after
the helper's call returns): the main prompt does not read it (it is the same for every pair), the link only says which programs were put together, so the
trainers' joint actions (`trainers.magrpo.joint_actions`) find the pair.
Sampling: the main prompt is the same for every helper sample, so with a fixed per-role seed (MAGRPO's
seeded rollouts) G calls would give G identical samples. Aligned calls therefore mix g (the helper's
sample index) into the call's seed (`nodes.call_seed`): G independent samples, as one call of n = G. Cross
calls use the question's seed with no offset, so
each helper is paired with the same S main samples (CoMLRL's G x G product of G aux and G main samples;
identical up to the engine's batch-dependent float noise; without a seed they are independent).

The main agent's turn in the state holds the *joint program* as its text (``<answer>`` helper code +
newline + main code ``</answer>``), so the runner's call-level rewards of each main call are the rewards
of its joint program (the joint reward MAGRPO gives both agents); the trace keeps each call's own text and
tokens. A main output without code has no program (its own text, no answer: scored 0). The helper's
turns keep their own text (their call-level rewards are recorded but no trainer reads them).
The team's answer is the program of pair 0 (helper sample 0, its main sample 0).

Trace: helper and main calls are node = role = agent, round 0. A failed helper call has no main calls;
a failed main call leaves its pair out (both are in `failures` and the trace).
"""

from __future__ import annotations

from typing import Annotated, Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from mlpo_agents.config import ConfigError
from mlpo_agents.models import ModelCallError
from mlpo_agents.rewards import extract_code

from .nodes import agent_node, call_seed, fan_out_each, find_turn, join, make_turn, require, turns_of, user
from .state import FailedTurn, TeamContext, TeamGraph, TeamState, Turn

ROLES = ("helper", "main")
HELPER = "aux"
"""The helper function's name (CoMLRL's)."""
_FORMAT = "inside <answer></answer> (no Markdown fences, no example usage, no tests)"


def _merge(left: dict[str, Any], right: dict[str, Any]) -> dict[str, Any]:
    return {**left, **right}


class CodePairState(TeamState, total=False):
    """TeamState plus the pairs: main call id -> the helper call it was paired with."""

    links: Annotated[dict[str, str], _merge]


def entry_point(ctx: TeamContext) -> str:
    """The function the task's tests call; a non-code task is misuse (stops the run with the fix)."""
    task = ctx.task
    if task is None or task.kind != "code" or not task.meta.get("entry_point"):
        what = "a free-form question" if task is None else f"task {task.id} (kind {task.kind!r})"
        raise ConfigError(
            f"the code_pair topology writes a program for a code task's tests, but got {what}; "
            "run it on a code task (--task code, humaneval or mbpp) or use another topology"
        )
    return str(task.meta["entry_point"])


def helper_prompt(state: dict[str, Any], agent: str, ctx: TeamContext) -> list[dict[str, Any]]:
    """The task prompt, and the helper's job: write `aux` only."""
    entry = entry_point(ctx)
    return user(
        f"{state['question']}\n\nYou are the helper of a two-agent team. Write one helper function named "
        f"`{HELPER}` that your teammate's `{entry}` can call to solve this problem. Write only `{HELPER}` "
        f"(with the imports it needs), not `{entry}`, {_FORMAT}."
    )


def main_prompt(state: dict[str, Any], agent: str, ctx: TeamContext) -> list[dict[str, Any]]:
    """The task prompt, and the main agent's job: write the entry point; `aux(...)` exists (name only)."""
    entry = entry_point(ctx)
    return user(
        f"{state['question']}\n\nYou are the main agent of a two-agent team. Your teammate writes a helper "
        f"function `{HELPER}(...)` that you can call. Write only the function `{entry}` (with the imports "
        f"it needs), not `{HELPER}`, {_FORMAT}. Call `{HELPER}` where it helps and use what it returns."
    )


def joint_program(helper_text: str, main_text: str) -> str | None:
    """The program of a pair: the helper's code, a newline, the main code; None without main code."""
    main = extract_code(main_text)
    if main is None:
        return None
    helper = extract_code(helper_text)
    return (helper + "\n" if helper else "") + main


def joint_turn(helper: Turn, main: Turn) -> Turn:
    """The main turn as the runner scores it: its text is the pair's program (its own text without one)."""
    turn = main.copy()
    program = joint_program(helper["text"], main["text"])
    if program is None:
        turn["answer"] = turn["answer_lenient"] = None
        return turn
    turn["text"] = f"<answer>\n{program}</answer>"
    turn["answer"] = turn["answer_lenient"] = extract_code(turn["text"])  # the reader make_turn(code=True) uses
    turn["truncated"] = bool(helper.get("truncated")) or bool(main.get("truncated"))
    return turn


def main_node(main_samples: int) -> Any:
    """The main agent, once per helper sample (the Send payload's `target`): S samples paired with it."""

    async def node(state: dict[str, Any], runtime: Runtime[TeamContext]) -> dict[str, Any]:
        ctx = runtime.context
        who = state.get("agent") or "main"
        helper = find_turn(state.get("turns", []), state["target"])
        # aligned (one main per helper sample): G independent samples of one prompt, one stream each
        offset = helper["sample_index"] if main_samples == 1 else 0
        try:
            outs = await ctx.client.acomplete(
                main_prompt(state, who, ctx),
                role="main",
                agent=who,
                round=0,
                n=main_samples,
                parent_call_id=helper["call_id"],
                seed=call_seed(state, ctx, who, 0, offset),
            )
        except ModelCallError as e:
            return {"failures": [FailedTurn(agent=who, role="main", round=0, error=str(e))]}
        turns = [joint_turn(helper, make_turn(s, who, "main", 0)) for s in outs]
        return {"turns": turns, "links": {t["call_id"]: helper["call_id"] for t in turns}}

    return node


def helpers_to_pair(state: dict[str, Any]) -> list[dict[str, Any]]:
    """One main payload per helper sample."""
    helpers = turns_of(state.get("turns", []), role="helper", round=0, first_sample_only=False)
    return [{"agent": "main", "target": t["call_id"]} for t in helpers]


def team_answer(state: dict[str, Any]) -> dict[str, Any]:
    """The program of pair 0: main sample 0 paired with helper sample 0 (None when that pair failed)."""
    turns, links = state.get("turns", []), state.get("links", {})
    helper = next((t for t in turns if t["role"] == "helper" and t["sample_index"] == 0), None)
    main = next(
        (
            t
            for t in turns
            if helper
            and t["role"] == "main"
            and t["sample_index"] == 0
            and links.get(t["call_id"]) == helper["call_id"]
        ),
        None,
    )
    return {"answer": main["answer"] if main else None}


def build_code_pair(samples: int = 2, main_samples: int = 1, checkpointer: Any = None) -> TeamGraph:
    """Helper (`aux`) and main (entry point) on a code task, each from the task prompt alone; G aligned (or
    G x S) joint programs. The main calls start after the helper's only to record which aux each pairs with."""
    require(samples >= 1, f"samples={samples}: the helper needs >= 1 sample (G >= 2 to train)")
    require(main_samples >= 1, f"main_samples={main_samples}: must be >= 1 (1 = aligned joint actions)")
    g = StateGraph(CodePairState, context_schema=TeamContext)
    g.add_node("helper", agent_node("helper", helper_prompt, samples=samples))
    g.add_node("written", join)
    g.add_node("main", main_node(main_samples))
    g.add_node("answer", team_answer)
    g.add_edge(START, "helper")
    g.add_edge("helper", "written")
    g.add_conditional_edges("written", fan_out_each("main", helpers_to_pair, "answer"), ["main", "answer"])
    g.add_edge("main", "answer")
    g.add_edge("answer", END)
    return g.compile(checkpointer=checkpointer, name="code_pair")
