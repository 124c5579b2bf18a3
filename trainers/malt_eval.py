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


def latest_episodes(store: TraceStore, team: str, task: str, ids: set[str]) -> tuple[dict[str, str], int]:
    """`team`'s latest finished episode per question id in `ids` (episode id -> task id), and how many
    questions' latest episode failed (the rule of `eval_cells.cell_from_store`)."""
    latest: dict[str, Any] = {}
    for ep in store.episodes(task=task, team=team):  # insertion order
        if ep.task_id not in ids or ep.status == "running":
            continue
        if ep.status in ("done", "degraded") or latest.get(ep.task_id) is None or latest[ep.task_id].status == "failed":
            latest[ep.task_id] = ep
    done = {ep.episode_id: ep.task_id for ep in latest.values() if ep.status in ("done", "degraded")}
    return done, sum(ep.status == "failed" for ep in latest.values())


def role_outcomes(store: TraceStore, team: str, task: str, tasks: Sequence[Task]) -> dict[str, dict[str, float]]:
    """Each role's own replies in `team`'s latest finished episodes (every chain): `strict`, the share whose
    strict answer is right; `cut`, the share stopped at the token cap; `tokens`, mean completion tokens.
    Which role a gain or a loss of the team comes from."""
    by_id = {t.id: t for t in tasks}
    done, _ = latest_episodes(store, team, task, set(by_id))
    sums: dict[str, list[float]] = {}
    for c in store.calls(episode_id=list(done)) if done else []:
        cut = c.finish_reason == "length"
        right = score_answer(by_id[done[c.episode_id]], extract_answer(c.text, truncated=cut)).value
        row = sums.setdefault(c.role, [0.0, 0.0, 0.0, 0.0])
        row[0] += right
        row[1] += cut
        row[2] += c.completion_tokens
        row[3] += 1
    return {role: {"strict": r / n, "cut": k / n, "tokens": t / n, "replies": int(n)} for role, (r, k, t, n) in sums.items()}


def roles_markdown(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> str:
    """`role_outcomes` before and after training as a Markdown table."""
    lines = ["| role, its own reply | strict before → after | cut at the cap before → after | tokens before → after |",
             "|---|---|---|---|"]  # fmt: skip
    for role, b in before.items():
        a = after.get(role, {})
        lines.append(f"| {role} | {b['strict']:.3f} → {a.get('strict', float('nan')):.3f} | {b['cut']:.0%} → "
                     f"{a.get('cut', float('nan')):.0%} | {b['tokens']:.0f} → {a.get('tokens', float('nan')):.0f} |")
    return "\n".join(lines)


def team_outcomes(store: TraceStore, team: str, task: str, tasks: Sequence[Task]) -> TeamOutcomes:
    """Strict and lenient outcomes of `team`'s latest finished episode per question in `tasks`."""
    by_id = {t.id: t for t in tasks}
    done, failed = latest_episodes(store, team, task, set(by_id))
    out = TeamOutcomes(failed=failed)
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
