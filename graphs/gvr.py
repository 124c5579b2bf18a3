"""Generator → verifier → refiner chains with a majority vote (MALT, Motwani et al. 2024, arXiv 2412.01928).

Each of M chains (`chain-1..M`, agents `generator-k`, `verifier-k`, `refiner-k`) runs: the generator
answers the question; the verifier critiques that answer; the refiner writes a corrected answer given
the question, the answer and the critique. The team's answer is the majority vote over the chains'
refined answers (ties: the earliest chain; M=1: the one chain's answer).

Trace: every call is round 0, node = role. The verifier's call records `parent_call_id` = the
generator call it critiques, the refiner's = the verifier call. `<role>_samples` = n draws n samples
of one prompt (one group id). By default the chain continues with sample 0; `tree=True` runs a
verifier per generator sample and a refiner per critique sample (the n×n×n MALT search tree, one
group per parent). The chain's answer is always the sample-0 line (refinement 0 of critique 0 of
answer 0). A chain whose generator (or its main-line verifier/refiner) fails is listed in
`failed_chains`; the failure is in `failures` and the trace, and the vote uses the other chains.

Deviations from the paper: the M chains advance in lockstep (all generators, then all verifiers,
then all refiners) so each stage is one parallel step; the prompts are ours, not the paper's.
"""

from __future__ import annotations

from typing import Annotated, Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from .nodes import (
    agent_ids,
    agent_node,
    fan_out,
    fan_out_each,
    find_turn,
    join,
    require,
    turns_of,
    user,
    vote,
)
from .state import TeamContext, TeamGraph, TeamState, Turn

ROLES = ("generator", "verifier", "refiner")


def _merge(left: dict[str, str], right: dict[str, str]) -> dict[str, str]:
    return {**left, **right}


class GVRState(TeamState, total=False):
    """TeamState plus the parent links of the chains."""

    links: Annotated[dict[str, str], _merge]
    """call id -> the call id it builds on (critique -> answer, refinement -> critique)."""
    chain_answers: dict[str, str | None]
    """chain id -> its refined answer (None when the chain failed or no answer parsed)."""
    failed_chains: list[str]
    """Chains without a main-line refinement because a call failed."""


def generator_prompt(state: dict[str, Any], agent: str, ctx: TeamContext) -> list[dict[str, Any]]:
    """The question."""
    return user(f"{state['question']}\n\n{ctx.instruction}")


def verifier_prompt(state: dict[str, Any], agent: str, ctx: TeamContext) -> list[dict[str, Any]]:
    """The question and the answer to critique (the `target` call)."""
    answer = find_turn(state.get("turns", []), state["target"])
    return user(
        f"{state['question']}\n\nProposed solution:\n{answer['text'].strip()}\n\n"
        "Critique this solution: check every step, point out any error, and say whether the final "
        "answer is correct. Do not write a new solution."
    )


def refiner_prompt(state: dict[str, Any], agent: str, ctx: TeamContext) -> list[dict[str, Any]]:
    """The question, the answer and the critique of it (the `target` call)."""
    turns = state.get("turns", [])
    critique = find_turn(turns, state["target"])
    answer = find_turn(turns, state.get("links", {}).get(state["target"]))
    return user(
        f"{state['question']}\n\nProposed solution:\n{answer['text'].strip()}\n\n"
        f"Critique of the solution:\n{critique['text'].strip()}\n\n"
        f"Using the critique, write a corrected solution. {ctx.instruction}"
    )


def linked_node(role: str, prompt: Any, samples: int | None) -> Any:
    """An agent node that builds on the `target` call: records it as parent in the trace and in `links`."""
    inner = agent_node(role, prompt, samples=samples, parent=lambda state, _: state["target"])

    async def node(state: dict[str, Any], runtime: Runtime[TeamContext]) -> dict[str, Any]:
        out = await inner(state, runtime)
        return {**out, "links": {t["call_id"]: state["target"] for t in out.get("turns", [])}}

    return node


def children(state: dict[str, Any], role: str, tree: bool) -> list[dict[str, Any]]:
    """One payload per output of `role` to build on: sample 0 of each chain, or every sample if `tree`.
    `branch` is the target's place in its tree (answer g: "g", critique c of it: "g.c"), mixed into the
    call's seed (`nodes.call_seed`): identical answers in one tree still get independent critiques."""
    following = {"generator": "verifier", "verifier": "refiner"}[role]
    turns, links = state.get("turns", []), state.get("links", {})

    def branch(t: Turn) -> str:
        parent = find_turn(turns, links[t["call_id"]]) if t["call_id"] in links else None
        return f"{parent['sample_index']}.{t['sample_index']}" if parent else str(t["sample_index"])

    return [
        {"agent": f"{following}-{t['agent'].rsplit('-', 1)[1]}", "target": t["call_id"], "branch": branch(t)}
        for t in turns_of(turns, role=role, first_sample_only=not tree)
    ]


def main_line(state: dict[str, Any], chain: str) -> Turn | None:
    """The chain's refinement along samples 0 (of critique 0 of answer 0), or None if that line broke."""
    turns, links, k = state.get("turns", []), state.get("links", {}), chain.rsplit("-", 1)[1]
    found: Turn | None = None
    for role in ROLES:
        parent = found["call_id"] if found else None
        found = next(
            (t for t in turns_of(turns, agent=f"{role}-{k}") if links.get(t["call_id"]) == parent), None
        )
        if found is None:
            return None
    return found


def tally_node(chains: list[str]) -> Any:
    """A node voting over the chains' refined answers (ties: earliest chain)."""

    def tally(state: dict[str, Any]) -> dict[str, Any]:
        refined = {c: main_line(state, c) for c in chains}
        answers = {c: t["answer"] if t else None for c, t in refined.items()}
        failed = [c for c, t in refined.items() if t is None]
        return {"chain_answers": answers, "failed_chains": failed, "answer": vote(answers.values())}

    return tally


def build_gvr(
    chains: int = 1,
    checkpointer: Any = None,
    generator_samples: int | None = None,
    verifier_samples: int | None = None,
    refiner_samples: int | None = None,
    tree: bool = False,
) -> TeamGraph:
    """M generator → verifier → refiner chains, then a majority vote over the refined answers."""
    require(chains >= 1, f"chains={chains}: GVR needs at least 1 chain (set chains >= 1)")
    for name, n in (
        ("generator_samples", generator_samples),
        ("verifier_samples", verifier_samples),
        ("refiner_samples", refiner_samples),
    ):
        require(n is None or n >= 1, f"{name}={n}: must be >= 1 (or None for one sample)")
    chain_ids = agent_ids("chain", chains)
    g = StateGraph(GVRState, context_schema=TeamContext)
    g.add_node("generator", agent_node("generator", generator_prompt, samples=generator_samples))
    g.add_node("generated", join)
    g.add_node("verifier", linked_node("verifier", verifier_prompt, verifier_samples))
    g.add_node("verified", join)
    g.add_node("refiner", linked_node("refiner", refiner_prompt, refiner_samples))
    g.add_node("vote", tally_node(chain_ids))
    g.add_conditional_edges(START, fan_out("generator", agent_ids("generator", chains)), ["generator"])
    g.add_edge("generator", "generated")
    g.add_conditional_edges(
        "generated",
        fan_out_each("verifier", lambda s: children(s, "generator", tree), "vote"),
        ["verifier", "vote"],
    )
    g.add_edge("verifier", "verified")
    g.add_conditional_edges(
        "verified",
        fan_out_each("refiner", lambda s: children(s, "verifier", tree), "vote"),
        ["refiner", "vote"],
    )
    g.add_edge("refiner", "vote")
    g.add_edge("vote", END)
    return g.compile(checkpointer=checkpointer, name="gvr")
