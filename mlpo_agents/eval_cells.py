"""The numbers of one (team, task) cell, scored from the trace store, with a 95% Wilson interval.

`cell_from_store` computes a `CellResult` from the recorded episode-level `correct` rewards in the trace
store (the latest finished episode per sampled question), never from an in-memory run, so a resumed
`mlpo eval` counts its earlier episodes; `wilson_interval` gives its 95% interval. Accuracy is over
finished episodes (`done` or `degraded`); a `failed` episode has no reward (it is not scored as wrong)
and is counted in the `failed` column instead. `mlpo eval` (`evaluate.py`, `report.py`) and the MALT
trainer's held-out evaluation both score with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

Z_95 = 1.959963984540054
"""Standard normal quantile for a two-sided 95% interval."""


@dataclass
class CellResult:
    """The numbers of one team on one task, computed from the trace store."""

    team: str
    """Team name (with `+<adapter>` when an adapter serves the trainable role)."""
    task: str
    """Task label: `<task>` or `<task>:<subset>`; also the task name recorded in the traces."""
    n: int
    """Questions with a finished episode (done or degraded): the accuracy denominator."""
    correct: float
    """Sum of the episode-level `correct` rewards."""
    accuracy: float
    """correct / n (NaN when n = 0)."""
    ci_low: float
    """Lower end of the 95% Wilson score interval."""
    ci_high: float
    """Upper end of the 95% Wilson score interval."""
    completion_tokens_per_q: float
    """Completion tokens of every agent's calls, averaged over finished questions."""
    prompt_tokens_per_q: float
    """Prompt tokens of every call, averaged over finished questions."""
    calls_per_q: float
    """Model calls (a call with n samples counts once) per finished question."""
    wall_s: float
    """Wall time spent running this cell, summed over resumed invocations."""
    answered: int
    """Finished episodes whose final answer parsed under the strict rule; the rest score 0."""
    degraded: int
    """Finished episodes in which some agent failed and the team answered anyway."""
    failed: int
    """Questions whose latest episode failed (no answer, no reward)."""
    questions: int
    """Questions in the sample."""
    lenient_accuracy: float = float("nan")
    """Accuracy under the lenient rule (an unclosed block, an answer phrase anywhere, else the last
    number), as harnesses for small models report it; NaN when the topology gives no lenient answer.
    Never trained on: a separately labelled column."""


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (successes out of n); (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if p == 0 else max(0.0, centre - half)  # exact ends: rounding must not cross the estimate
    high = 1.0 if p == 1 else min(1.0, centre + half)
    return low, high



def cell_from_store(store: Any, team: str, task: str, task_ids: list[str], wall_s: float = 0.0) -> CellResult:
    """Score one (team, task) cell from the trace store: the latest finished episode per sampled question."""
    wanted = set(task_ids)
    latest: dict[str, Any] = {}
    for ep in store.episodes(task=task, team=team):  # insertion order: later episodes win
        if ep.task_id not in wanted or ep.status == "running":
            continue
        finished = ep.status in ("done", "degraded")
        if finished or latest.get(ep.task_id) is None or latest[ep.task_id].status == "failed":
            latest[ep.task_id] = ep
    done = [ep for ep in latest.values() if ep.status in ("done", "degraded")]
    failed = sum(ep.status == "failed" for ep in latest.values())
    ids = [ep.episode_id for ep in done]
    rewards = (
        {r.episode_id: r.value for r in store.rewards(episode_id=ids, name="correct") if r.call_id is None}
        if ids
        else {}
    )
    missing = [i for i in ids if i not in rewards]
    if missing:
        raise RuntimeError(
            f"{len(missing)} finished episodes of {team} on {task} have no episode-level `correct` reward "
            f"(e.g. {missing[0]}); the trace store is incomplete, rerun this cell without --resume"
        )
    lenient = (
        {r.episode_id: r.value for r in store.rewards(episode_id=ids, name="correct_lenient") if r.call_id is None}
        if ids
        else {}
    )
    calls = store.calls(episode_id=ids) if ids else []
    n = len(done)
    correct = float(sum(rewards.values()))
    low, high = wilson_interval(correct, n)
    per_q = (lambda total: total / n) if n else (lambda total: float("nan"))
    return CellResult(
        team=team,
        task=task,
        n=n,
        correct=correct,
        accuracy=correct / n if n else float("nan"),
        ci_low=low,
        ci_high=high,
        completion_tokens_per_q=per_q(sum(c.completion_tokens for c in calls)),
        prompt_tokens_per_q=per_q(sum(c.prompt_tokens for c in calls if c.sample_index == 0)),
        calls_per_q=per_q(len({c.group_id for c in calls})),
        wall_s=wall_s,
        answered=sum(ep.final_answer is not None for ep in done),
        degraded=sum(ep.status == "degraded" for ep in done),
        failed=failed,
        questions=len(wanted),
        lenient_accuracy=sum(lenient.values()) / len(lenient) if lenient and len(lenient) == n else float("nan"),
    )
