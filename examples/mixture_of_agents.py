"""Mixture-of-agents (Wang et al. 2024, arXiv 2406.04692) as a user topology, built only from the public API.

Layer 0: N proposers (`proposer-1..N`) answer the question. Layer l > 0: every proposer reads all
answers of layer l-1 and writes an improved one. Finally an `aggregator` reads the last layer and
writes the team's answer. Trace: proposer calls have round = layer; the aggregator is recorded at
round = layers. `aggregator_samples` = G draws G aggregator samples (one GRPO group); the answer is
sample 0's. Run it from the repo root (the module must be importable, hence PYTHONPATH=.):

    PYTHONPATH=. mlpo run --team examples/mixture_of_agents.yaml --task arithmetic --limit 2
    PYTHONPATH=. mlpo run --team my_team.yaml --topology examples.mixture_of_agents:build_mixture_of_agents \\
        --param proposers=3 --param layers=2

A team for it needs roles `proposer` and `aggregator` (see examples/mixture_of_agents.yaml).
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph

from mlpo_agents.graphs.nodes import (
    agent_ids,
    agent_node,
    fan_out,
    latest,
    next_round,
    require,
    round_loop,
    turns_of,
    user,
)
from mlpo_agents.graphs.state import TeamContext, TeamState

ROLES = ("proposer", "aggregator")
"""Roles a team needs for this topology; `mlpo run` checks them before any episode starts."""


def proposer_prompt(state: dict[str, Any], agent: str, ctx: TeamContext) -> list[dict[str, Any]]:
    """Layer 0: the question. Later layers: the question and every answer of the previous layer."""
    previous = turns_of(state.get("turns", []), role="proposer", round=state.get("round", 0) - 1)
    if not previous:
        return user(f"{state['question']}\n\n{ctx.instruction}")
    listed = "\n\n".join(f"{i}. {t['text'].strip()}" for i, t in enumerate(previous, 1))
    return user(
        f"{state['question']}\n\nResponses from other models:\n\n{listed}\n\n"
        f"Synthesize these responses into a single, better answer. {ctx.instruction}"
    )


def aggregator_prompt(state: dict[str, Any], agent: str, ctx: TeamContext) -> list[dict[str, Any]]:
    """The question and the last layer's answers."""
    return proposer_prompt(state, agent, ctx)


def finish(state: dict[str, Any]) -> dict[str, Any]:
    """The team answer is the aggregator's (sample 0)."""
    last = latest(state.get("turns", []), "aggregator")
    return {"answer": last["answer"] if last else None}


def build_mixture_of_agents(
    proposers: int = 3, layers: int = 2, aggregator_samples: int | None = None, checkpointer: Any = None
) -> CompiledStateGraph:
    """`layers` layers of `proposers` proposers, then one aggregator."""
    require(proposers >= 1, f"proposers={proposers}: set proposers >= 1")
    require(layers >= 1, f"layers={layers}: set layers >= 1")
    to_proposers = fan_out("proposer", agent_ids("proposer", proposers))
    g = StateGraph(TeamState, context_schema=TeamContext)
    g.add_node("proposer", agent_node("proposer", proposer_prompt))
    g.add_node("next_layer", next_round)
    g.add_node("aggregator", agent_node("aggregator", aggregator_prompt, samples=aggregator_samples))
    g.add_node("finish", finish)
    g.add_conditional_edges(START, to_proposers, ["proposer"])
    g.add_edge("proposer", "next_layer")
    g.add_conditional_edges(
        "next_layer", round_loop(layers, to_proposers, "aggregator"), ["proposer", "aggregator"]
    )
    g.add_edge("aggregator", "finish")
    g.add_edge("finish", END)
    return g.compile(checkpointer=checkpointer, name="mixture_of_agents")
