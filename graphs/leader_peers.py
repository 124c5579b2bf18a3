"""Leader-with-peers (MLPO, Estornell et al. 2025, arXiv 2507.08960).

Round 0: K peers answer the question in parallel; the leader reads the question and the K answers
and writes reasoning plus a final `<answer>`. Round t>0: each peer revises given its previous answer
and the leader's last output; the leader aggregates again. The team's answer is the leader's answer
after the last round. K=0 is the solo leader. `leader_samples` > 1 draws G leader samples that share
one prompt and one group id (the GRPO group); the run continues with sample 0.
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import START, StateGraph

from .nodes import (
    agent_ids,
    agent_node,
    fan_out,
    latest,
    require,
    round_loop,
    turns_of,
    user,
)
from .state import TeamContext, TeamGraph, TeamState, Turn

ROLES = ("leader", "peer")


def peer_prompt(state: dict[str, Any], agent: str, ctx: TeamContext) -> list[dict[str, Any]]:
    """Round 0: the question. Later rounds: the question, this peer's last answer and the leader's output."""
    question = state["question"]
    mine, leader = latest(state.get("turns", []), agent), latest(state.get("turns", []), "leader")
    if state.get("round", 0) == 0 or leader is None:
        return user(f"{question}\n\n{ctx.instruction}")
    previous = mine["text"] if mine else "(no answer)"
    return user(
        f"{question}\n\nYour previous answer:\n{previous}\n\nThe team leader wrote:\n{leader['text']}\n\n"
        f"Reconsider the problem and give your answer. {ctx.instruction}"
    )


def leader_prompt(state: dict[str, Any], agent: str, ctx: TeamContext) -> list[dict[str, Any]]:
    """The question plus the peers' latest answers of this round (none for a solo leader)."""
    proposals = turns_of(state.get("turns", []), role="peer", round=state.get("round", 0))
    if not proposals:
        return user(f"{state['question']}\n\n{ctx.instruction}")
    listed = "\n\n".join(f"[Agent {i}]\n{t['text'].strip()}" for i, t in enumerate(proposals, 1))
    return user(
        f"{state['question']}\n\nProposed solutions from {len(proposals)} team members:\n\n{listed}\n\n"
        f"The proposals may be wrong. Check them, reason step by step, and give the correct final answer. "
        f"{ctx.instruction}"
    )


def leader_done(state: dict[str, Any], turns: list[Turn]) -> dict[str, Any]:
    """The leader node's `then`: advance the round and set the team answer to the leader's latest answer
    (this call's sample 0; a failed call leaves the previous round's)."""
    last = latest([*state.get("turns", []), *turns], "leader")
    return {
        "round": state.get("round", 0) + 1,
        "answer": last["answer"] if last else None,
        "answer_lenient": last.get("answer_lenient") if last else None,
    }


def build_leader_peers(
    peers: int = 3, rounds: int = 1, leader_samples: int | None = None, checkpointer: Any = None
) -> TeamGraph:
    """K peers → leader, repeated for `rounds` rounds."""
    require(peers >= 0, f"peers={peers}: the number of peers must be >= 0 (0 is a solo leader)")
    require(rounds >= 1, f"rounds={rounds}: a team needs at least 1 round")
    require(leader_samples is None or leader_samples >= 1, f"leader_samples={leader_samples}: must be >= 1")
    g = StateGraph(TeamState, context_schema=TeamContext)
    g.add_node("leader", agent_node("leader", leader_prompt, samples=leader_samples, then=leader_done))
    if peers:
        g.add_node("peer", agent_node("peer", peer_prompt))
        to_peers = fan_out("peer", agent_ids("peer", peers))
        g.add_conditional_edges(START, to_peers, ["peer"])
        g.add_edge("peer", "leader")
        g.add_conditional_edges("leader", round_loop(rounds, to_peers), ["peer", "__end__"])
    else:
        g.add_edge(START, "leader")
        g.add_conditional_edges("leader", round_loop(rounds, "leader"), ["leader", "__end__"])
    return g.compile(checkpointer=checkpointer, name="leader_peers")
