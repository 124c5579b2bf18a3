"""Multi-agent debate (Du et al. 2023, "Improving Factuality and Reasoning in Language Models through
Multiagent Debate", arXiv 2305.14325).

Round 0: N debaters (`debater-1..N`) answer the question independently. Each later round every
debater sees its own latest answer and the other debaters' latest answers and revises. `rounds`
counts every round including round 0 (as in leader_peers: rounds=1 is the independent answers
alone, the default rounds=2 is one revision). After each round the team answer is the majority
vote over that round's answers (ties: the earliest debater; an agent that failed that round does
not vote; a round where every debater failed keeps the previous answer). With `judge=True` a
`judge` agent reads the last round's answers and its answer is final (the vote stays the fallback
when the judge fails). `samples` = G draws G samples per debater call (one group id each); the
debate continues with sample 0. `judge_samples` does the same for the judge.

Trace: debater calls are node `debater`, role `debater`, round 0..rounds-1; the judge call is node
and role `judge`, recorded at round = rounds (it speaks after the last round).

Deviations from the paper: a debater's prompt is one user message holding its own and the others'
latest answers, not its whole multi-turn history (shorter prompts for small models); the judge is
an option here (the paper votes).
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph

from .nodes import (
    agent_ids,
    agent_node,
    fan_out,
    latest,
    require,
    round_loop,
    turns_of,
    user,
    vote,
)
from .state import TeamContext, TeamGraph, TeamState

ROLES = ("debater", "judge")


def debater_prompt(state: dict[str, Any], agent: str, ctx: TeamContext) -> list[dict[str, Any]]:
    """Round 0: the question. Later rounds: the question, this debater's and the others' latest answers."""
    question, turns = state["question"], state.get("turns", [])
    others = [
        t for t in (latest(turns, a) for a in debaters_in(turns)) if t is not None and t["agent"] != agent
    ]
    mine = latest(turns, agent)
    if state.get("round", 0) == 0 or not (others or mine):
        return user(f"{question}\n\n{ctx.instruction}")
    own = f"Your previous answer:\n{mine['text'].strip()}\n\n" if mine else ""
    if not others:  # a debate of one (or everyone else failed so far): self-reflection
        return user(
            f"{question}\n\n{own}Examine your answer step by step and give an updated answer. {ctx.instruction}"
        )
    listed = "\n\n".join(f"[{t['agent']}]\n{t['text'].strip()}" for t in others)
    return user(
        f"{question}\n\n{own}Answers from the other agents:\n\n{listed}\n\n"
        f"Using the other agents' reasoning as additional advice, examine your answer and theirs step "
        f"by step and give an updated answer. {ctx.instruction}"
    )


def judge_prompt(state: dict[str, Any], agent: str, ctx: TeamContext) -> list[dict[str, Any]]:
    """The question and the debaters' answers of the last round."""
    final = last_round(state)
    listed = "\n\n".join(f"[{t['agent']}]\n{t['text'].strip()}" for t in final)
    return user(
        f"{state['question']}\n\nAfter a debate, {len(final)} agents gave these final answers:\n\n{listed}\n\n"
        f"Judge which answer is correct, reasoning step by step, and give the final answer. {ctx.instruction}"
    )


def _index(agent: str) -> int:
    return int(agent.rsplit("-", 1)[1])


def debaters_in(turns: list[Any]) -> list[str]:
    """Debater ids that have spoken, in debater order."""
    return sorted({t["agent"] for t in turns if t["role"] == "debater"}, key=_index)


def last_round(state: dict[str, Any]) -> list[Any]:
    """Sample-0 debater turns of the latest round that has any, in debater order."""
    turns = turns_of(state.get("turns", []), role="debater")
    if not turns:
        return []
    round_ = max(t["round"] for t in turns)
    return sorted((t for t in turns if t["round"] == round_), key=lambda t: _index(t["agent"]))


def tally(state: dict[str, Any]) -> dict[str, Any]:
    """Vote over this round's answers (earliest debater wins ties) and advance the round."""
    round_ = state.get("round", 0)
    this_round = [t for t in last_round(state) if t["round"] == round_]
    update: dict[str, Any] = {"round": round_ + 1}
    if this_round:
        update["answer"] = vote(t["answer"] for t in this_round)
        update["answer_lenient"] = vote(t.get("answer_lenient") for t in this_round)
    return update


def verdict(state: dict[str, Any]) -> dict[str, Any]:
    """The judge's answer, or the vote when the judge failed or gave none."""
    judged = latest(state.get("turns", []), "judge")
    return {"answer": judged["answer"]} if judged and judged["answer"] is not None else {}


def build_debate(
    agents: int = 3,
    rounds: int = 2,
    judge: bool = False,
    checkpointer: Any = None,
    samples: int | None = None,
    judge_samples: int | None = None,
) -> TeamGraph:
    """N debaters for `rounds` rounds (round 0 included), then a majority vote or a judge."""
    require(agents >= 1, f"agents={agents}: a debate needs at least 1 agent (set agents >= 1, e.g. 3)")
    require(
        rounds >= 1,
        f"rounds={rounds}: a debate needs at least 1 round (rounds counts round 0; set rounds >= 1)",
    )
    require(samples is None or samples >= 1, f"samples={samples}: must be >= 1 (or None for one sample)")
    require(judge_samples is None or judge_samples >= 1, f"judge_samples={judge_samples}: must be >= 1")
    require(judge or judge_samples is None, "judge_samples is set but judge=False: set judge=True or drop it")
    debaters = agent_ids("debater", agents)
    g = StateGraph(TeamState, context_schema=TeamContext)
    g.add_node("debater", agent_node("debater", debater_prompt, samples=samples))
    g.add_node("tally", tally)
    to_debaters = fan_out("debater", debaters)
    g.add_conditional_edges(START, to_debaters, ["debater"])
    g.add_edge("debater", "tally")
    if judge:
        g.add_node("judge", agent_node("judge", judge_prompt, samples=judge_samples))
        g.add_node("verdict", verdict)
        g.add_conditional_edges("tally", round_loop(rounds, to_debaters, "judge"), ["debater", "judge"])
        g.add_edge("judge", "verdict")
        g.add_edge("verdict", END)
    else:
        g.add_conditional_edges("tally", round_loop(rounds, to_debaters), ["debater", END])
    return g.compile(checkpointer=checkpointer, name="debate")
