"""`mlpo eval`: run team configs over task samples and report accuracy with Wilson intervals and cost.

One run folder (`runs/<name>/`) holds everything: `traces.sqlite` (every episode, call and reward),
`results.json`, `results.md` and two plots. Each (team, task) cell is a `run_team` call recorded under
task name `<task>[:<subset>]` and the team's name, so `--resume` skips the rows a cell already
finished. The numbers are computed from the trace store and rendered by `report.py` (scoring rules in
its docstring), so a resumed run counts its earlier episodes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import time
from itertools import product
from pathlib import Path
from typing import Any

from mlpo_agents.report import EvalReport, cell_from_store, format_number, results_markdown, write_reports

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
    from mlpo_agents.cli import parse_task_options
    from mlpo_agents.tasks import OPTIONS, load_task

    names = [parse_task_spec(spec)[0] for spec in specs]
    options = parse_task_options(getattr(args, "task_option", None), names[0] if len(names) == 1 else "")
    for key in options:
        if not any(key in OPTIONS.get(name, ()) for name in names):
            valid = {name: OPTIONS[name] for name in names if name in OPTIONS}
            raise ValueError(f"--task-option {key}: none of the tasks {', '.join(names)} takes it (options: {valid or 'none'})")
    out = {}
    for spec in specs:
        name, subset = parse_task_spec(spec)
        mine = {k: v for k, v in options.items() if k in OPTIONS.get(name, ())}
        rows = load_task(
            name, data_dir=args.data_dir, split=args.split, subset=subset, limit=args.limit, seed=args.seed, **mine
        )
        if not rows:
            raise ValueError(f"task {spec!r} has no rows (split {args.split or 'default'})")
        out[f"{name}:{subset}" if subset else name] = rows
    return out


def load_teams(specs: list[str], max_tokens: int | None) -> list[Any]:
    """TeamConfigs for built-in names or YAML paths, with an optional max_tokens cap on every role."""
    from mlpo_agents.config import load_team
    from mlpo_agents.graphs import check_topology

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
        check_topology(team)
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
    """Hot-load a peft adapter into the local engine of each trainable role and route those roles to it
    (`adapters.hot_load`: the adapter must have been trained on the role's base model)."""
    from mlpo_agents.adapters import hot_load

    roles = team.trainable_roles()
    if not roles:
        raise ValueError(
            f"team {team.name!r} has no trainable role to apply --adapter to; mark one `trainable: true`"
        )
    name = adapter_label(folder)
    for role in roles:
        model = team.deployment(team.role(role).model)["litellm_params"]["model"]
        if not model.startswith("local/"):
            raise ValueError(
                f"--adapter loads into the in-process engine, but role {role!r} of team {team.name!r} is served by "
                f"{model}; for vLLM load the LoRA on the server (`mlpo serve`) and point the team at it"
            )
        hot_load(client, role, folder, name)
    return name


# ---------------------------------------------------------------------------------------- run folder


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
    parts += [f"--task-option {item}" for item in getattr(args, "task_option", None) or []]
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
            client = client.with_team(team)
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
                f"[{team.name} × {label}] accuracy {format_number(cell.accuracy, 3)} ({cell.correct:.0f}/{cell.n}) "
                f"CI [{cell.ci_low:.3f}, {cell.ci_high:.3f}]  {format_number(cell.completion_tokens_per_q, 0)} tok/q  "
                f"ran {summary.episodes + summary.failed}, resumed {summary.skipped}  {summary.wall_s:.0f}s",
                file=sys.stderr,
            )


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
        default="word_problems",
        help="comma-separated tasks, `name` or `name:subset` (gsm8k,arithmetic,bbh:navigate,mmlu:anatomy)",
    )
    p.add_argument("--limit", type=int, default=30, help="questions per task (seeded sample; 0 or less: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for the question samples")
    p.add_argument("--split", default=None, help="dataset split (default: each task's test split)")
    p.add_argument(
        "--task-option", action="append", default=None, metavar="KEY=VALUE",
        help="task loader option for the tasks that take it, repeatable (arithmetic: max_value, ops, ...)",
    )
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
