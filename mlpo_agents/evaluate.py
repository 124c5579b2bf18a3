"""`mlpo eval`: run team configs over task samples and report accuracy with Wilson intervals and cost.

One run folder (`runs/<name>/`) holds everything: `traces.sqlite` (every episode, call and reward),
`results.json`, `results.md` and two plots. Each (team, task) cell is a `run_team` call recorded under
task name `<task>[:<subset>]` and the team's name, so `--resume` skips the rows a cell already
finished. The numbers are computed from the recorded episode-level `correct` rewards in the trace
store, never from the in-memory run alone, so a resumed run counts its earlier episodes.

Accuracy is over finished episodes (`done` or `degraded`); a `failed` episode has no reward (it is
not scored as wrong) and is counted in the `failed` column instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import product
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
    """Finished episodes with a parseable final answer (`<answer>` block or `\\boxed{}`); the rest score 0."""
    degraded: int
    """Finished episodes in which some agent failed and the team answered anyway."""
    failed: int
    """Questions whose latest episode failed (no answer, no reward)."""
    questions: int
    """Questions in the sample."""


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
    )


# ---------------------------------------------------------------------------------------- inputs


def parse_task_spec(spec: str) -> tuple[str, str | None]:
    """'bbh:navigate' -> ('bbh', 'navigate'); 'gsm8k' -> ('gsm8k', None)."""
    name, _, subset = spec.strip().partition(":")
    return name, subset or None


def _split_list(value: str, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ValueError(f"--{what} is empty; give a comma-separated list")
    if len(set(items)) != len(items):
        raise ValueError(f"--{what} {value!r} names an item twice")
    return items


def load_tasks(specs: list[str], args: argparse.Namespace) -> dict[str, list[Any]]:
    """Task label -> rows, for every spec; raises (listing the valid names) before anything runs."""
    from mlpo_agents.tasks import load_task

    out = {}
    for spec in specs:
        name, subset = parse_task_spec(spec)
        rows = load_task(
            name, data_dir=args.data_dir, split=args.split, subset=subset, limit=args.limit, seed=args.seed
        )
        if not rows:
            raise ValueError(f"task {spec!r} has no rows (split {args.split or 'default'})")
        out[f"{name}:{subset}" if subset else name] = rows
    return out


def load_teams(specs: list[str], max_tokens: int | None) -> list[Any]:
    """TeamConfigs for built-in names or YAML paths, with an optional max_tokens cap on every role."""
    from mlpo_agents.config import load_team

    teams = []
    for spec in specs:
        team = load_team(spec)
        if max_tokens is not None:
            roles = {
                role: rc.model_copy(
                    update={"sampling": rc.sampling.model_copy(update={"max_tokens": max_tokens})}
                )
                for role, rc in team.roles.items()
            }
            team = team.model_copy(update={"roles": roles})
        teams.append(team)
    names = [t.name for t in teams]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"two teams are named {duplicates[0]!r} ({', '.join(specs)}); give each team YAML its own `name:` "
            "so its traces and results stay apart"
        )
    return teams


def adapter_label(path: str | Path) -> str:
    """An engine adapter name for an adapter folder: `runs/x/adapter` -> `x-adapter`."""
    p = Path(path).resolve()
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{p.parent.name}-{p.name}").strip("-") or "adapter"


def apply_adapter(team: Any, client: Any, folder: str | Path) -> str:
    """Load a peft adapter into the local engine of each trainable role and route those roles to it."""
    from mlpo_agents import zoo
    from mlpo_agents.engine import get_engine, parse_local_model
    from mlpo_agents.trainers.lora import adapter_base_model

    roles = team.trainable_roles()
    if not roles:
        raise ValueError(
            f"team {team.name!r} has no trainable role to apply --adapter to; mark one `trainable: true`"
        )
    name = adapter_label(folder)
    trained_on = adapter_base_model(folder)
    for role in roles:
        deployment = team.deployment(team.role(role).model)
        params = dict(deployment["litellm_params"])
        if not params["model"].startswith("local/"):
            raise ValueError(
                f"--adapter loads into the in-process engine, but role {role!r} of team {team.name!r} is served by "
                f"{params['model']}; for vLLM load the LoRA on the server (`mlpo serve`) and point the team at it"
            )
        spec, _ = parse_local_model(params["model"])
        if zoo.base_model_id(spec) != trained_on:
            raise ValueError(
                f"adapter {folder} was trained on {trained_on!r}, but role {role!r} of team {team.name!r} runs "
                f"{zoo.base_model_id(spec)!r}; evaluate it with a team on {trained_on!r}"
            )
        engine = get_engine(spec, **({"dtype": params["dtype"]} if params.get("dtype") else {}))
        if name not in engine.adapters:
            engine.load_adapter(name, folder)
        client.use_version(role, name, {**params, "model": f"local/{spec}@{name}"})
    return name


# ---------------------------------------------------------------------------------------- outputs


def _fmt(x: float, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def results_markdown(report: EvalReport) -> str:
    """The results table as markdown (one row per team × task)."""
    lines = [
        "| Team | Task | n | Accuracy | 95% CI (Wilson) | Completion tokens / q | Calls / q | Answered | Wall (s) | Degraded | Failed |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report.cells:
        lines.append(
            f"| {c.team} | {c.task} | {c.n} | {_fmt(c.accuracy, 3)} | [{c.ci_low:.3f}, {c.ci_high:.3f}] | "
            f"{_fmt(c.completion_tokens_per_q, 0)} | {_fmt(c.calls_per_q, 1)} | {c.answered}/{c.n} | {c.wall_s:.0f} | {c.degraded} | {c.failed} |"
        )
    return (
        f"Command: `{report.command}`\n\n"
        + "\n".join(lines)
        + f"\n\nTotal wall time: {report.wall_s:.0f} s. "
        "Accuracy is the mean episode-level `correct` reward over finished episodes; Answered counts the "
        "episodes whose final answer parsed (an `<answer>` block or `\\boxed{}`): an unparsed answer scores 0.\n"
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


def _previous_walls(path: Path) -> dict[tuple[str, str], float]:
    if not path.exists():
        return {}
    try:
        cells = json.loads(path.read_text()).get("cells", [])
        return {(c["team"], c["task"]): float(c.get("wall_s", 0.0)) for c in cells}
    except (ValueError, KeyError, TypeError):
        return {}


def _command(args: argparse.Namespace) -> str:
    parts = ["mlpo eval", f"--name {args.name}", f"--teams {args.teams}", f"--tasks {args.tasks}"]
    if args.limit is not None:
        parts.append(f"--limit {args.limit}")
    parts.append(f"--seed {args.seed}")
    for flag, value in (
        ("--split", args.split),
        ("--adapter", args.adapter),
        ("--max-tokens", args.max_tokens),
        ("--dtype", args.dtype),
        ("--runs-dir", None if args.runs_dir == "runs" else args.runs_dir),
    ):
        if value is not None:
            parts.append(f"{flag} {value}")
    if args.concurrency != 8:
        parts.append(f"--concurrency {args.concurrency}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------- command


def run_eval(args: argparse.Namespace) -> EvalReport:
    """Run every team on every task (skipping finished rows with --resume) and write the reports."""
    from mlpo_agents.models import ModelClient, preflight
    from mlpo_agents.trace import open_store

    if args.concurrency < 1:
        raise ValueError(f"--concurrency {args.concurrency}: must be >= 1")
    if args.limit is not None and args.limit <= 0:
        args.limit = None
    if args.dtype:
        os.environ["MLPO_ENGINE_DTYPE"] = args.dtype
    if args.adapter and not Path(args.adapter).is_dir():
        raise FileNotFoundError(
            f"--adapter {args.adapter}: no such adapter folder (expected a peft adapter saved by a trainer)"
        )
    tasks = load_tasks(_split_list(args.tasks, "tasks"), args)
    teams = load_teams(_split_list(args.teams, "teams"), args.max_tokens)
    out_dir = Path(args.runs_dir) / args.name
    traces = out_dir / "traces.sqlite"
    if traces.exists() and not args.resume:
        if not args.overwrite:
            raise ValueError(
                f"{out_dir} already holds an eval; pass --resume to continue it, --overwrite to start over, "
                "or --name for a new run"
            )
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for team in teams:
        preflight(team)
    store = open_store(traces)
    previous = _previous_walls(out_dir / "results.json") if args.resume else {}
    report = EvalReport(
        name=args.name,
        command=_command(args),
        tasks=list(tasks),
        limit=args.limit,
        seed=args.seed,
        teams={},
    )
    clients = {}
    for team in teams:
        client = ModelClient(team, store)
        if args.adapter:
            version = apply_adapter(team, client, args.adapter)
            team = team.model_copy(update={"name": f"{team.name}+{version}"})
            client.team = team
        clients[team.name] = (team, client)
        report.teams[team.name] = {
            "topology": team.topology,
            "params": team.params,
            "adapter": args.adapter,
            "models": sorted({d["litellm_params"]["model"] for d in team.model_list}),
        }
    running: dict[tuple[str, str], float] = {}  # the cell in progress -> its start time
    start = time.perf_counter()
    try:
        asyncio.run(_run_cells(args, clients, tasks, store, report, previous, running))
    finally:
        # An interrupted run still reports every cell from what the store holds (partial cells included).
        order = {(team_name, label): i for i, (label, team_name) in enumerate(product(tasks, clients))}
        have = {(c.team, c.task) for c in report.cells}
        for team_name, label in order:
            if (team_name, label) in have:
                continue
            elapsed = (
                time.perf_counter() - running[team_name, label] if (team_name, label) in running else 0.0
            )
            cell = cell_from_store(
                store,
                team_name,
                label,
                [r.id for r in tasks[label]],
                previous.get((team_name, label), 0.0) + elapsed,
            )
            if cell.n or cell.failed:
                report.cells.append(cell)
        report.cells.sort(key=lambda c: order[c.team, c.task])
        report.wall_s = sum(c.wall_s for c in report.cells) if args.resume else time.perf_counter() - start
        if report.cells:
            write_reports(report, out_dir, plots=not args.no_plots)
    return report


async def _run_cells(
    args: argparse.Namespace,
    clients: dict[str, tuple[Any, Any]],
    tasks: dict[str, list[Any]],
    store: Any,
    report: EvalReport,
    previous: dict[tuple[str, str], float],
    running: dict[tuple[str, str], float],
) -> None:
    """Task by task, every team on it, in one event loop (the Router and engines outlive a cell).

    Task-major order puts the teams side by side early: an interrupted run can still compare them.
    """
    from mlpo_agents.runner import run_team

    for label, rows in tasks.items():
        for team, client in clients.values():
            print(f"[{team.name} × {label}] {len(rows)} questions", file=sys.stderr)
            running[team.name, label] = time.perf_counter()
            summary = await run_team(
                team,
                rows,
                store,
                task_name=label,
                client=client,
                concurrency=args.concurrency,
                resume=args.resume,
                progress=not args.quiet,
            )
            del running[team.name, label]
            wall = previous.get((team.name, label), 0.0) + summary.wall_s
            cell = cell_from_store(store, team.name, label, [r.id for r in rows], wall)
            report.cells.append(cell)
            print(
                f"[{team.name} × {label}] accuracy {_fmt(cell.accuracy, 3)} ({cell.correct:.0f}/{cell.n}) "
                f"CI [{cell.ci_low:.3f}, {cell.ci_high:.3f}]  {_fmt(cell.completion_tokens_per_q, 0)} tok/q  "
                f"ran {summary.episodes + summary.failed}, resumed {summary.skipped}  {summary.wall_s:.0f}s",
                file=sys.stderr,
            )


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


def cmd_eval(args: argparse.Namespace) -> int:
    """`mlpo eval`: run, then print the markdown table."""
    try:
        report = run_eval(args)
    except KeyboardInterrupt:
        print(
            f"interrupted: finished episodes are in {Path(args.runs_dir) / args.name / 'traces.sqlite'}; "
            "rerun with --resume to continue",
            file=sys.stderr,
        )
        return 130
    print(results_markdown(report))
    print(
        f"wrote {Path(args.runs_dir) / args.name}/results.{{json,md}}"
        + ("" if args.no_plots else ", accuracy.png, accuracy_vs_tokens.png"),
        file=sys.stderr,
    )
    return 0


def add_subcommand(subparsers: Any) -> None:
    """Register `mlpo eval`."""
    p = subparsers.add_parser(
        "eval", help="evaluate teams on task samples: accuracy, Wilson CI, tokens, plots"
    )
    p.add_argument(
        "--teams",
        default="solo,default",
        help="comma-separated team YAMLs or built-ins (solo, default, gvr, debate, tiny, ...)",
    )
    p.add_argument(
        "--tasks",
        default="gsm8k",
        help="comma-separated tasks, `name` or `name:subset` (gsm8k,arithmetic,bbh:navigate,mmlu:anatomy)",
    )
    p.add_argument("--limit", type=int, default=30, help="questions per task (seeded sample; 0 or less: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for the question samples")
    p.add_argument("--split", default=None, help="dataset split (default: each task's test split)")
    p.add_argument(
        "--data-dir", default=None, help="local benchmark folder (default: $MLPO_DATA_DIR, else the hub)"
    )
    p.add_argument("--name", default="eval", help="run name: outputs go to <runs-dir>/<name>/")
    p.add_argument("--runs-dir", default="runs", help="parent folder of run folders")
    p.add_argument(
        "--resume", action="store_true", help="skip rows already finished in <runs-dir>/<name>/traces.sqlite"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="delete an existing run folder of that name first"
    )
    p.add_argument(
        "--adapter", default=None, help="peft adapter folder applied to every team's trainable role"
    )
    p.add_argument(
        "--max-tokens", type=int, default=None, help="cap max_tokens of every role (cheap smoke runs)"
    )
    p.add_argument("--concurrency", type=int, default=8, help="episodes in flight at once")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="local engine dtype")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)
