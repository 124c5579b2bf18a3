"""Eval results: score (team, task) cells from the trace store; write results.json, results.md and plots.

`cell_from_store` computes a `CellResult` from the recorded episode-level `correct` rewards in the trace
store (the latest finished episode per sampled question), never from an in-memory run, so a resumed
`mlpo eval` counts its earlier episodes; `wilson_interval` gives its 95% interval. Accuracy is over
finished episodes (`done` or `degraded`); a `failed` episode has no reward (it is not scored as wrong)
and is counted in the `failed` column instead. `write_reports` writes an `EvalReport` as strict JSON,
a markdown table and two matplotlib plots. Running the teams is `evaluate.py`'s job.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
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


@dataclass
class EvalReport:
    """Everything `results.json` holds."""

    name: str
    command: str
    teams: dict[str, dict[str, Any]]
    tasks: list[str]
    limit: int | None
    seed: int
    cells: list[CellResult] = field(default_factory=list)
    wall_s: float = 0.0
    created_at: float = field(default_factory=time.time)


# ---------------------------------------------------------------------------------------- statistics


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


@dataclass(frozen=True)
class PairedComparison:
    """Two systems scored on the same questions: accuracies, discordant pairs and McNemar's exact test."""

    n: int
    """Questions both systems were scored on."""
    before: float
    after: float
    gained: int
    """Questions wrong before and right after."""
    lost: int
    """Questions right before and wrong after."""
    p_value: float
    """Two-sided exact McNemar p-value (binomial test of `gained` among the discordant pairs)."""


def paired_comparison(before: dict[str, float], after: dict[str, float]) -> PairedComparison:
    """Compare per-question 0/1 outcomes keyed by task id (only questions present in both count)."""
    keys = sorted(set(before) & set(after))
    gained = sum(1 for k in keys if before[k] < 0.5 <= after[k])
    lost = sum(1 for k in keys if after[k] < 0.5 <= before[k])
    n = len(keys)
    return PairedComparison(
        n=n,
        before=sum(before[k] for k in keys) / n if n else float("nan"),
        after=sum(after[k] for k in keys) / n if n else float("nan"),
        gained=gained,
        lost=lost,
        p_value=mcnemar_exact(gained, lost),
    )


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for discordant counts b and c: P(|X - m/2| >= |b - m/2|), X ~ Bin(m, 1/2)."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1)) / 2**m
    return min(1.0, 2 * tail)


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


# ---------------------------------------------------------------------------------------- outputs


def format_number(x: float, digits: int = 1) -> str:
    """`x` with `digits` decimals, or an en dash for a missing (NaN) value."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def results_markdown(report: EvalReport) -> str:
    """The results table as markdown (one row per team × task)."""
    lines = [
        "| Team | Task | n | Accuracy (strict) | 95% CI (Wilson) | Lenient accuracy | Completion tokens / q | Calls / q | Answered | Wall (s) | Degraded | Failed |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report.cells:
        lines.append(
            f"| {c.team} | {c.task} | {c.n} | {format_number(c.accuracy, 3)} | [{c.ci_low:.3f}, {c.ci_high:.3f}] | "
            f"{format_number(c.lenient_accuracy, 3)} | "
            f"{format_number(c.completion_tokens_per_q, 0)} | {format_number(c.calls_per_q, 1)} | {c.answered}/{c.n} | {c.wall_s:.0f} | {c.degraded} | {c.failed} |"
        )
    return (
        f"Command: `{report.command}`\n\n"
        + "\n".join(lines)
        + f"\n\nTotal wall time: {report.wall_s:.0f} s. "
        "Accuracy is the mean episode-level `correct` reward over finished episodes, under the strict answer "
        "rule (a closed `<answer>` block, `\\boxed{}`, or a final-answer phrase ending the reply; nothing from a "
        "reply cut at the token limit): the rule rewards are trained with. Answered counts the episodes whose "
        "final answer parsed under it. Lenient accuracy (an unclosed block, an answer phrase anywhere, else the "
        "last number) is shown for comparison with harnesses that use it; nothing trains on it.\n"
    )


def plot_results(report: EvalReport, out_dir: Path) -> list[Path]:
    """accuracy.png (bars with Wilson error bars) and accuracy_vs_tokens.png (accuracy against cost)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teams = list(dict.fromkeys(c.team for c in report.cells))
    tasks = list(dict.fromkeys(c.task for c in report.cells))
    cell = {(c.team, c.task): c for c in report.cells}
    colours = plt.get_cmap("tab10")
    width = 0.8 / max(len(teams), 1)

    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(tasks) * max(1, len(teams)) ** 0.5), 4))
    for i, team in enumerate(teams):
        xs, ys, err_low, err_high = [], [], [], []
        for j, task in enumerate(tasks):
            c = cell.get((team, task))
            if c is None or c.n == 0:
                continue
            xs.append(j + (i - (len(teams) - 1) / 2) * width)
            ys.append(c.accuracy)
            err_low.append(max(0.0, c.accuracy - c.ci_low))
            err_high.append(max(0.0, c.ci_high - c.accuracy))
        ax.bar(xs, ys, width, yerr=[err_low, err_high], capsize=3, label=team, color=colours(i % 10))
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95% Wilson CI)")
    ax.set_title(f"{report.name}: accuracy by team and task")
    ax.legend(fontsize="small")
    fig.tight_layout()
    accuracy_png = out_dir / "accuracy.png"
    fig.savefig(accuracy_png, dpi=120)
    plt.close(fig)

    markers = "osD^vP*X"
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, team in enumerate(teams):
        for j, task in enumerate(tasks):
            c = cell.get((team, task))
            if c is None or c.n == 0:
                continue
            ax.errorbar(
                c.completion_tokens_per_q,
                c.accuracy,
                yerr=[[max(0.0, c.accuracy - c.ci_low)], [max(0.0, c.ci_high - c.accuracy)]],
                fmt=markers[j % len(markers)],
                color=colours(i % 10),
                capsize=3,
                label=team if j == 0 else None,
            )
            ax.annotate(
                task,
                (c.completion_tokens_per_q, c.accuracy),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize="x-small",
            )
    ax.set_xlabel("completion tokens per question (all agents)")
    ax.set_ylabel("accuracy (95% Wilson CI)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report.name}: accuracy against tokens spent")
    ax.legend(fontsize="small")
    fig.tight_layout()
    tokens_png = out_dir / "accuracy_vs_tokens.png"
    fig.savefig(tokens_png, dpi=120)
    plt.close(fig)
    return [accuracy_png, tokens_png]


def write_reports(report: EvalReport, out_dir: Path, plots: bool = True) -> list[Path]:
    """Write results.json, results.md and (with plots) the two PNG files; returns their paths."""
    data = _nan_to_none(asdict(report))  # strict JSON: an empty cell's NaN becomes null
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(data, indent=2, default=str, allow_nan=False) + "\n")
    md_path.write_text(results_markdown(report))
    paths = [json_path, md_path]
    if plots:
        paths += plot_results(report, out_dir)
    return paths


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value
