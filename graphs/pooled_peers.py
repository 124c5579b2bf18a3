"""Leader-with-peers whose round-0 peer proposals come from a reusable pool (MLPO's offline peer pool).

Estornell et al. 2025 (arXiv 2507.08960) pre-generate the K peers' proposals once per question and
reuse them while training the leader. Here the pool fills itself: the first time a question is seen
its peers are called as usual (normal recorded calls, `pool_samples` samples each) and their turns are
kept in the `PeerPool`; later episodes of that question reuse a pooled sample instead of calling the
peers again. Rounds > 0 (peers revising after the leader) always call the peers. The leader's prompt
is the same as in `leader_peers`, so a leader trained here works in the plain topology.
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import START, StateGraph
from langgraph.runtime import Runtime

from .leader_peers import leader_done, leader_prompt, peer_prompt
from .nodes import agent_ids, agent_node, fan_out, require, round_loop, vote
from .state import TeamContext, TeamGraph, TeamState, Turn


class PeerPool:
    """Round-0 peer turns per question key and agent; `pick` chooses which pooled sample episodes see."""

    def __init__(self, entries: dict[str, dict[str, list[Turn]]] | None = None, pick: int = 0):
        self.entries: dict[str, dict[str, list[Turn]]] = entries or {}
        self.pick = pick
        """Index (mod the number of samples) of the pooled sample used by the next episodes."""
        self.hits = 0
        self.misses = 0

    def get(self, key: str, agent: str) -> Turn | None:
        """The pooled turn this episode uses (as sample 0), or None when the question is not pooled."""
        samples = self.entries.get(key, {}).get(agent)
        if not samples:
            return None
        return {**samples[self.pick % len(samples)], "sample_index": 0}

    def add(self, key: str, agent: str, turns: list[Turn]) -> None:
        """Keep an agent's freshly sampled turns for a question (the first ones win)."""
        self.entries.setdefault(key, {}).setdefault(agent, [dict(t) for t in turns])  # type: ignore[misc]

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def to_json(self) -> dict[str, Any]:
        """A JSON-able copy (for checkpoints)."""
        return {"entries": self.entries, "pick": self.pick}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PeerPool:
        """Inverse of `to_json`."""
        return cls(data.get("entries", {}), int(data.get("pick", 0)))


def _key(state: dict[str, Any], ctx: TeamContext) -> str:
    return ctx.task.id if ctx.task is not None else state["question"]


def pooled_peer_node(pool: PeerPool, samples: int | None) -> Any:
    """A peer node that reuses the pool in round 0 and otherwise calls the model (filling the pool)."""
    call_peer = agent_node("peer", peer_prompt, samples=samples)

    async def node(state: dict[str, Any], runtime: Runtime[TeamContext]) -> dict[str, Any]:
        agent, round_ = state["agent"], state.get("round", 0)
        if round_ == 0:
            pooled = pool.get(_key(state, runtime.context), agent)
            if pooled is not None:
                pool.hits += 1
                return {"turns": [pooled]}
            pool.misses += 1
        update = await call_peer(state, runtime)
        if round_ == 0 and update.get("turns"):
            pool.add(_key(state, runtime.context), agent, update["turns"])
        return update

    return node


def build_pooled_peers(
    peers: int = 3,
    rounds: int = 1,
    leader_samples: int | None = None,
    pool: PeerPool | None = None,
    pool_samples: int | None = None,
    checkpointer: Any = None,
) -> TeamGraph:
    """K pooled peers → leader, repeated for `rounds` rounds (`pool=None` starts an empty pool)."""
    require(
        peers >= 1, f"peers={peers}: a peer pool needs at least 1 peer (use leader_peers for a solo leader)"
    )
    require(rounds >= 1, f"rounds={rounds}: a team needs at least 1 round")
    require(pool_samples is None or pool_samples >= 1, f"pool_samples={pool_samples}: must be >= 1")
    pool = pool if pool is not None else PeerPool()
    g = StateGraph(TeamState, context_schema=TeamContext)
    g.add_node("peer", pooled_peer_node(pool, pool_samples))
    g.add_node("leader", agent_node("leader", leader_prompt, samples=leader_samples, then=leader_done))
    to_peers = fan_out("peer", agent_ids("peer", peers))
    g.add_conditional_edges(START, to_peers, ["peer"])
    g.add_edge("peer", "leader")
    g.add_conditional_edges("leader", round_loop(rounds, to_peers), ["peer", "__end__"])
    return g.compile(checkpointer=checkpointer, name="pooled_peers")


def peer_vote(state: dict[str, Any]) -> dict[str, Any]:
    """The team answer of a peers-only episode: the majority of every pooled peer sample's answer."""
    turns = [t for t in state.get("turns", []) if t["role"] == "peer"]
    return {"round": 1, "answer": vote(t["answer"] for t in turns)}


def build_peer_fill(
    peers: int = 3, pool: PeerPool | None = None, pool_samples: int | None = None, checkpointer: Any = None
) -> TeamGraph:
    """K peers only, filling `pool` (MLPO's pre-generation pass): each peer samples `pool_samples` answers
    once per question; the episode's answer is their majority vote, and each sample's correctness is
    recorded like any call's, which is what MLPO's easy-question filter reads before training."""
    require(peers >= 1, f"peers={peers}: filling a peer pool needs at least 1 peer")
    pool = pool if pool is not None else PeerPool()
    g = StateGraph(TeamState, context_schema=TeamContext)
    g.add_node("peer", pooled_peer_node(pool, pool_samples))
    g.add_node("vote", peer_vote)
    g.add_conditional_edges(START, fan_out("peer", agent_ids("peer", peers)), ["peer"])
    g.add_edge("peer", "vote")
    return g.compile(checkpointer=checkpointer, name="peer_fill")
