"""Eval results: score (team, task) cells from the trace store; write results.json, results.md and plots.

`cell_from_store` (in `eval_cells`, still importable from here) computes a `CellResult` from the recorded
episode-level `correct` rewards in the trace store; `wilson_interval` gives its 95% interval. Paired
comparisons (McNemar's exact test) are here. `write_reports` writes an `EvalReport` as strict JSON, a
markdown table and two matplotlib plots. Running the teams is `evaluate.py`'s job.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlpo_agents.eval_cells import Z_95 as Z_95
from mlpo_agents.eval_cells import CellResult
from mlpo_agents.eval_cells import (
    cell_from_store as cell_from_store,  # moved to `eval_cells`; importable here
)
from mlpo_agents.eval_cells import wilson_interval as wilson_interval


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


def command_line(script: str, flags: dict[str, Any]) -> str:
    """`python <script>` with `flags` (argparse's `vars(args)`) as the command line that reproduces them:
    a true switch as `--flag`, a false or None one left out."""
    parts = ["python", script]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif value is not None and value is not False:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def write_learning_results(out: Path, results: dict[str, Any], table: str) -> None:
    """A learning benchmark's outputs: `<out>/results.json` (`results`) and `<out>/results.md` (`table`),
    and the table printed."""
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(table)
    print("\n" + table)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


def paired_row(before: dict[str, float], after: dict[str, float], **extra: Any) -> dict[str, Any]:
    """One row of a learning benchmark's before/after table, JSON-able: accuracies with 95% Wilson
    intervals, gained / lost questions and McNemar's exact p (`extra` is carried along, e.g. lenient)."""
    paired = paired_comparison(before, after)
    return {
        "n": paired.n,
        "before": paired.before,
        "before_ci": wilson_interval(paired.before * paired.n, paired.n),
        "after": paired.after,
        "after_ci": wilson_interval(paired.after * paired.n, paired.n),
        "gained": paired.gained,
        "lost": paired.lost,
        "p_value": paired.p_value,
        **extra,
    }


def paired_markdown(title: str, rows: dict[str, dict[str, Any]], label: str = "system") -> str:
    """`rows` (name -> `paired_row`) as a Markdown table under `title`; a lenient column when rows carry
    `before_lenient` / `after_lenient`."""
    lenient = all("before_lenient" in r for r in rows.values())
    head = f"| {label} | n | before (strict) [95% CI] | after (strict) [95% CI] | gained / lost | McNemar p |"
    lines = [
        title,
        "",
        head + (" lenient before → after |" if lenient else ""),
        "|---|---:|---|---|---:|---:|" + ("---|" if lenient else ""),
    ]
    for name, r in rows.items():
        line = (
            f"| {name} | {r['n']} | {r['before']:.3f} [{r['before_ci'][0]:.3f}, {r['before_ci'][1]:.3f}] | "
            f"{r['after']:.3f} [{r['after_ci'][0]:.3f}, {r['after_ci'][1]:.3f}] | {r['gained']} / {r['lost']} | "
            f"{r['p_value']:.2g} |"
        )
        lines.append(line + (f" {r['before_lenient']:.3f} → {r['after_lenient']:.3f} |" if lenient else ""))
    return "\n".join(lines) + "\n"


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for discordant counts b and c: P(|X - m/2| >= |b - m/2|), X ~ Bin(m, 1/2)."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1)) / 2**m
    return min(1.0, 2 * tail)


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
