"""`mlpo` command line: run a team, inspect traces, draw topologies, evaluate, train, serve."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_TRACES = "runs/traces.sqlite"


class UserError(Exception):
    """An error caused by input the user can fix; printed as one line, no traceback."""


def _team(args: argparse.Namespace) -> Any:
    from mlpo_agents.config import default_team, load_team

    team = load_team(args.team) if args.team else default_team()
    updates: dict[str, Any] = {}
    params = dict(team.params)
    if getattr(args, "topology", None) and args.topology != team.topology:
        # The team's params belong to its own topology; the new one starts from its defaults.
        updates["topology"], updates["params"], params = args.topology, {}, {}
    if getattr(args, "param", None):
        for item in args.param:
            key, _, value = item.partition("=")
            if not _:
                raise UserError(f"--param {item!r}: use key=value, e.g. --param peers=2")
            params[key] = json.loads(value) if value[:1] in "-0123456789[{tfn\"" else value
        updates["params"] = params
    return team.model_copy(update=updates) if updates else team


def _tasks(args: argparse.Namespace) -> list[Any]:
    from mlpo_agents.tasks import load_task

    return load_task(args.task, data_dir=args.data_dir, split=args.split, subset=args.subset,
                     limit=args.limit, seed=args.seed)


def cmd_run(args: argparse.Namespace) -> int:
    """Run a team over a task sample and print accuracy, tokens and wall time."""
    from mlpo_agents.models import ModelClient, preflight
    from mlpo_agents.runner import run_team
    from mlpo_agents.trace import open_store

    if args.dtype:
        os.environ["MLPO_ENGINE_DTYPE"] = args.dtype
    team = _team(args)
    tasks = _tasks(args)
    preflight(team)
    store = open_store(args.traces)
    client = ModelClient(team, store)
    stream = _printer() if args.verbose else None
    print(f"team {team.name} ({team.topology}, {team.params}) on {args.task}: {len(tasks)} questions, "
          f"traces -> {args.traces}", file=sys.stderr)
    try:
        checkpoints = f"{args.traces}.checkpoints" if args.checkpoint else None
        summary = asyncio.run(run_team(team, tasks, store, task_name=args.task, client=client,
                                       concurrency=args.concurrency, resume=args.resume, stream=stream,
                                       checkpoints=checkpoints))
    except KeyboardInterrupt:
        print(f"interrupted: finished episodes are in {args.traces}; rerun with --resume to continue", file=sys.stderr)
        return 130
    n = max(summary.episodes, 1)
    print(
        f"accuracy {summary.accuracy:.3f} ({summary.correct:.0f}/{summary.episodes})  "
        f"degraded {summary.degraded}  failed {summary.failed}  skipped {summary.skipped}\n"
        f"calls {summary.calls}  prompt tokens {summary.prompt_tokens}  completion tokens "
        f"{summary.completion_tokens} ({summary.completion_tokens / n:.0f}/question)  "
        f"wall {summary.wall_s:.1f}s  ({summary.completion_tokens / max(summary.wall_s, 1e-9):.1f} tok/s)"
    )
    return 0


def _printer() -> Any:
    def show(episode_id: str, update: dict[str, Any]) -> None:
        for turn in update.get("turns", []):
            text = " ".join(turn["text"].split())[:80]
            print(f"[{episode_id[:6]}] {update['node']:<10} {turn['agent']:<8} r{turn['round']} "
                  f"-> {turn['answer']!r}  {text}", file=sys.stderr)
        for failure in update.get("failures", []):
            print(f"[{episode_id[:6]}] {update['node']:<10} {failure['agent']:<8} FAILED {failure['error']}",
                  file=sys.stderr)

    return show


def cmd_traces(args: argparse.Namespace) -> int:
    """Show a summary of a trace store or export it."""
    from mlpo_agents.trace import open_store

    if not Path(args.traces).exists():
        raise UserError(f"no trace store at {args.traces}; run `mlpo run` first or pass --traces")
    store = open_store(args.traces)
    if args.action == "export":
        out = args.out or ("traces.jsonl" if args.format == "jsonl" else "traces_parquet")
        if args.format == "jsonl":
            print(f"wrote {store.export_jsonl(out)} events to {out}")
        else:
            print("wrote " + ", ".join(str(p) for p in store.export_parquet(out)))
        return 0
    episodes = store.episodes()
    if args.episode:
        calls = store.calls(episode_id=[e.episode_id for e in episodes if e.episode_id.startswith(args.episode)])
        for c in calls:
            print(f"{c.node:<10} {c.agent:<8} r{c.round} g{c.group_id[:6]}#{c.sample_index} {c.version:<8} "
                  f"{c.prompt_tokens}+{c.completion_tokens} tok {c.latency_s:.2f}s  {' '.join(c.text.split())[:90]}")
        return 0
    by_status: dict[str, int] = {}
    for e in episodes:
        by_status[e.status] = by_status.get(e.status, 0) + 1
    rewards = [r.value for r in store.rewards(name="correct") if r.call_id is None]
    print(f"{args.traces}: {len(episodes)} episodes {by_status}, {len(store.calls())} calls, "
          f"{len(store.failures())} failures, episode accuracy "
          f"{(sum(rewards) / len(rewards)) if rewards else float('nan'):.3f}")
    for e in episodes[-args.last:]:
        print(f"  {e.episode_id}  {e.task}/{e.task_id:<18} {e.team:<10} {e.status:<9} answer={e.final_answer!r}")
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    """Print a topology as mermaid, or write a PNG."""
    from mlpo_agents.graphs import build_topology

    params = dict(json.loads(args.params)) if args.params else {}
    drawable = build_topology(args.topology, **params).get_graph()
    if args.png:
        try:
            Path(args.png).write_bytes(drawable.draw_mermaid_png())
        except Exception as e:  # noqa: BLE001 - mermaid PNG rendering needs network or pyppeteer
            raise UserError(f"cannot render PNG here ({e}); use the mermaid text printed without --png") from None
        print(f"wrote {args.png}")
    else:
        print(drawable.draw_mermaid())
    return 0


def _add_task_args(p: argparse.ArgumentParser, limit: int | None) -> None:
    p.add_argument("--task", default="gsm8k", help="task name (gsm8k, arithmetic, math, bbh, mmlu, csqa, ...)")
    p.add_argument("--split", default=None, help="dataset split (default: the task's test split)")
    p.add_argument("--subset", default=None, help="task subset (a BBH task, an MMLU subject, a difficulty)")
    p.add_argument("--limit", type=int, default=limit, help="number of questions (seeded sample)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for the question sample")
    p.add_argument("--data-dir", default=None, help="local benchmark folder (default: $MLPO_DATA_DIR, else the hub)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    parser = argparse.ArgumentParser(prog="mlpo", description=__doc__)
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run a team on a task sample and record traces")
    run.add_argument("--team", default=None, help="team YAML (or a built-in: default, solo, tiny, vllm)")
    run.add_argument("--topology", default=None, help="override the topology (name or module:function)")
    run.add_argument("--param", action="append", help="override a topology parameter, key=value")
    _add_task_args(run, limit=8)
    run.add_argument("--concurrency", type=int, default=4, help="episodes in flight at once")
    run.add_argument("--traces", default=DEFAULT_TRACES, help="trace store (SQLite path)")
    run.add_argument("--resume", action="store_true", help="skip task rows already finished in --traces")
    run.add_argument("--checkpoint", action="store_true",
                     help="checkpoint every graph step (SQLite) so --resume continues interrupted episodes")
    run.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="local engine dtype")
    run.add_argument("--verbose", action="store_true", help="stream every agent's output as it arrives")
    run.set_defaults(func=cmd_run)

    traces = sub.add_parser("traces", help="inspect or export a trace store")
    traces.add_argument("action", choices=["show", "export"])
    traces.add_argument("--traces", default=DEFAULT_TRACES)
    traces.add_argument("--episode", default=None, help="show the calls of one episode (id prefix)")
    traces.add_argument("--last", type=int, default=10, help="episodes to list")
    traces.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    traces.add_argument("--out", default=None)
    traces.set_defaults(func=cmd_traces)

    graph = sub.add_parser("graph", help="print a topology as mermaid (or --png FILE)")
    graph.add_argument("--topology", default="leader_peers")
    graph.add_argument("--params", default=None, help='builder parameters as JSON, e.g. \'{"peers": 2}\'')
    graph.add_argument("--png", default=None)
    graph.set_defaults(func=cmd_graph)

    for module_name in PLUGGED_COMMANDS:
        importlib.import_module(module_name).add_subcommand(sub)
    return parser


# Modules that add their own subcommand with `add_subcommand(subparsers)`. They import heavy
# dependencies (torch, vllm clients) inside their command functions, so `mlpo --help` stays fast.
PLUGGED_COMMANDS: tuple[str, ...] = ("mlpo_agents.evaluate", "mlpo_agents.trainers.loop", "mlpo_agents.serve")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mlpo` command."""
    from mlpo_agents.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        args = parser.parse_args(["run", *(argv or [])])
    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"mlpo {args.command or 'run'}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
