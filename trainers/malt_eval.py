"""MALT's held-out outcomes per question, read from the trace store, so before and after pair.

`team_outcomes` takes the latest finished evaluation episode of each question and returns its strict
outcome (the episode-level `correct` reward of the chains' majority vote: what trains, what is reported)
and the lenient one. The gvr graph gives no lenient team answer, so the lenient figure is rebuilt here
the way `graphs.gvr` votes the strict one: each chain's main-line refinement read under the lenient rule
(`rewards.extract_answer(lenient=True)`), a majority vote over the chains (ties: the earliest chain),
scored with `rubric.score_answer`. A question whose latest episode failed has no outcome (it is counted
as failed, never as wrong), so a paired comparison uses only questions answered both times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlpo_agents.graphs.nodes import vote
from mlpo_agents.rewards import extract_answer
from mlpo_agents.rubric import score_answer

if TYPE_CHECKING:
    from mlpo_agents.tasks.base import Task
    from mlpo_agents.trace import TraceStore


@dataclass
class TeamOutcomes:
    """Per-question outcomes of one evaluation of a gvr team."""

    correct: dict[str, float] = field(default_factory=dict)
    """task id -> strict 0/1 outcome of the majority vote (finished episodes only)."""
    lenient: dict[str, float] = field(default_factory=dict)
    """task id -> 0/1 outcome of the lenient majority vote (reported, never trained on)."""
    failed: int = 0
    """Questions whose latest episode failed: no outcome."""

    @property
    def lenient_accuracy(self) -> float:
        """Mean lenient outcome (NaN when no question finished)."""
        return sum(self.lenient.values()) / len(self.lenient) if self.lenient else float("nan")


def chain_key(agent: str) -> int:
    """`refiner-3` -> 3: the chain's place in the vote's tie-break."""
    return int(agent.rsplit("-", 1)[1])


def team_outcomes(store: TraceStore, team: str, task: str, tasks: Sequence[Task]) -> TeamOutcomes:
    """Strict and lenient outcomes of `team`'s latest finished episode per question in `tasks`."""
    by_id = {t.id: t for t in tasks}
    latest: dict[str, Any] = {}
    for ep in store.episodes(task=task, team=team):  # insertion order; the rule of `eval_cells.cell_from_store`
        if ep.task_id not in by_id or ep.status == "running":
            continue
        if ep.status in ("done", "degraded") or latest.get(ep.task_id) is None or latest[ep.task_id].status == "failed":
            latest[ep.task_id] = ep
    out = TeamOutcomes(failed=sum(ep.status == "failed" for ep in latest.values()))
    done = {ep.episode_id: ep.task_id for ep in latest.values() if ep.status in ("done", "degraded")}
    if not done:
        return out
    strict = {r.episode_id: r.value for r in store.rewards(episode_id=list(done), name="correct") if r.call_id is None}
    missing = set(done) - set(strict)
    if missing:
        raise RuntimeError(
            f"{len(missing)} finished episodes of {team} have no episode-level `correct` reward "
            f"(e.g. {sorted(missing)[0]}); the trace store is incomplete, rerun this evaluation without --resume"
        )
    refinements: dict[str, list[tuple[int, str | None]]] = {e: [] for e in done}
    for c in store.calls(episode_id=list(done), role="refiner"):
        if c.sample_index == 0:  # evaluation chains draw one sample per role
            refinements[c.episode_id].append((chain_key(c.agent), extract_answer(c.text, lenient=True)))
    for episode, task_id in done.items():
        out.correct[task_id] = float(strict[episode])
        answer = vote(a for _, a in sorted(refinements[episode], key=lambda x: x[0]))
        out.lenient[task_id] = float(score_answer(by_id[task_id], answer).value)
    return out
