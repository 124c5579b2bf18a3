"""`mlpo` command line: run a team, inspect traces, draw topologies, evaluate, train, serve."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

DEFAULT_TRACES = "runs/traces.sqlite"


class UserError(Exception):
    """An error caused by input the user can fix; printed as one line, no traceback."""


def _team(args: argparse.Namespace) -> Any:
    from mlpo_agents.config import default_team, load_team
    from mlpo_agents.graphs import check_topology

    team = load_team(args.team) if args.team else default_team()
    updates: dict[str, Any] = {}
    params = dict(team.params)
    if getattr(args, "topology", None) and args.topology != team.topology:
        # The team's params belong to its own topology; the new one starts from its defaults plus --param.
        if team.params and not getattr(args, "param", None):
            import inspect

            from mlpo_agents.graphs import builder_of

            given = ", ".join(f"{k}={v}" for k, v in team.params.items())
            takes = ", ".join(
                f"{k}={p.default}" for k, p in inspect.signature(builder_of(args.topology)).parameters.items()
                if k != "checkpointer" and p.default is not inspect.Parameter.empty
            )
            raise UserError(
                f"--topology {args.topology} differs from team {team.name!r}'s topology {team.topology!r}, whose "
                f"params ({given}) would be dropped; give the new topology's parameters with --param key=value "
                f"(it takes: {takes or 'none'}), or write a team file with `topology: {args.topology}`"
            )
        updates["topology"], updates["params"], params = args.topology, {}, {}
    if getattr(args, "param", None):
        for item in args.param:
            key, _, value = item.partition("=")
            if not _:
                raise UserError(f"--param {item!r}: use key=value, e.g. --param peers=2")
            params[key] = parse_value(value, scalar=False)
        updates["params"] = params
    team = team.model_copy(update=updates) if updates else team
    check_topology(team)
    return team


def parse_value(text: str, *, scalar: bool = True) -> Any:
    """A command-line value read as YAML (``2`` -> 2, ``true`` -> True, ``+-`` -> "+-"); text that is
    not valid YAML, or (with ``scalar``) is not a YAML scalar, stays the string as typed."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if scalar and not isinstance(value, str | int | float | bool | type(None)):
        return text
    return value


def parse_task_options(items: list[str] | None, task: str) -> dict[str, Any]:
    """``--task-option key=value`` items as load_task keyword options (unknown keys fail in load_task)."""
    from mlpo_agents.tasks import OPTIONS

    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            valid = ", ".join(OPTIONS.get(task, ())) or "none"
            raise UserError(
                f"--task-option {item!r}: use key=value, e.g. --task-option max_value=20 "
                f"(options of task {task!r}: {valid})"
            )
        options[key.strip().replace("-", "_")] = parse_value(value)
    return options


def _tasks(args: argparse.Namespace) -> list[Any]:
    from mlpo_agents.tasks import load_task

    tasks = load_task(args.task, data_dir=args.data_dir, split=args.split, subset=args.subset,
                      limit=args.limit, seed=args.seed, **parse_task_options(args.task_option, args.task))
    if not tasks:
        raise UserError(f"task {args.task!r} (split {args.split or 'default'}) has no questions; "
                        "choose another --split or --subset")
    return tasks


def cmd_run(args: argparse.Namespace) -> int:
    """Run a team over a task sample and print accuracy, tokens and wall time."""
    from mlpo_agents.models import preflight
    from mlpo_agents.team import Team
    from mlpo_agents.trace import open_store

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: the number of questions must be >= 1, e.g. --limit 8")
    if args.concurrency < 1:
        raise UserError(f"--concurrency {args.concurrency}: must be >= 1, e.g. --concurrency 4")
    if args.dtype:
        os.environ["MLPO_ENGINE_DTYPE"] = args.dtype
    team = _team(args)
    if args.checkpoint:  # fail before any store is opened when the builder cannot take a checkpointer
        from mlpo_agents.graphs import check_params

        check_params(team.topology, {**team.params, "checkpointer": None})
    tasks = _tasks(args)
    preflight(team)
    runner = Team(team, open_store(args.traces))
    stream = _printer() if args.verbose else None
    print(f"team {team.name} ({team.topology}, {team.params}) on {args.task}: {len(tasks)} questions, "
          f"traces -> {args.traces}", file=sys.stderr)
    try:
        checkpoints = f"{args.traces}.checkpoints" if args.checkpoint else None
        summary = asyncio.run(runner.arun(tasks, task_name=args.task, concurrency=args.concurrency,
                                          resume=args.resume, stream=stream, checkpoints=checkpoints))
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

    is_url = args.traces.startswith(("postgres://", "postgresql://"))
    if not is_url and not Path(args.traces).exists():
        raise UserError(f"no trace store at {args.traces}; run `mlpo run` first or pass --traces")
    wal_beside = is_url or Path(f"{args.traces}-wal").exists()  # looked at before opening creates one
    with open_store(args.traces) as store:
        episodes = store.episodes()
        if not episodes and not wal_beside:
            print(f"warning: {args.traces} holds no episodes and no {Path(args.traces).name}-wal is beside it: "
                  "if you copied a store while it was being written, copy the -wal file too", file=sys.stderr)
        if args.action == "export":
            out = args.out or ("traces.jsonl" if args.format == "jsonl" else "traces_parquet")
            if args.format == "jsonl":
                print(f"wrote {store.export_jsonl(out)} events to {out}")
            else:
                print("wrote " + ", ".join(str(p) for p in store.export_parquet(out)))
            return 0
        if args.action == "export-otel":
            from mlpo_agents.otel import export_store

            n, spans = export_store(store, endpoint=args.endpoint, out=args.out, content=args.content,
                                    episodes=args.episode)
            print(f"exported {n} episodes ({spans} spans) to {args.endpoint or args.out}")
            return 0
        if args.episode:
            ids = [e.episode_id for e in episodes if e.episode_id.startswith(tuple(args.episode))]
            if not ids:
                raise UserError(f"no episode id in {args.traces} starts with {' or '.join(args.episode)!r}; "
                                "`mlpo traces show` lists the latest ids")
            for c in store.calls(episode_id=ids):
                print(f"{c.node:<10} {c.agent:<8} r{c.round} g{c.group_id[:6]}#{c.sample_index} {c.version:<8} "
                      f"{c.prompt_tokens}+{c.completion_tokens} tok {c.latency_s:.2f}s  {' '.join(c.text.split())[:90]}")
            return 0
        # Interrupted episodes were restarted by a resume: their task rows are counted once, by the new episode.
        counted = [e for e in episodes if e.status != "interrupted"]
        by_status: dict[str, int] = {}
        for e in counted:
            by_status[e.status] = by_status.get(e.status, 0) + 1
        interrupted = len(episodes) - len(counted)
        rewards = [r.value for r in store.rewards(name="correct") if r.call_id is None]
        print(f"{args.traces}: {len(counted)} episodes {by_status}, {len(store.calls())} calls, "
              f"{len(store.failures())} failures, episode accuracy "
              f"{(sum(rewards) / len(rewards)) if rewards else float('nan'):.3f}"
              + (f"; {interrupted} interrupted episodes not counted (a resume restarted their rows)" if interrupted else ""))
        for e in episodes[-args.last:]:
            print(f"  {e.episode_id}  {e.task}/{e.task_id:<18} {e.team:<10} {e.status:<11} answer={e.final_answer!r}")
        return 0


MERMAID_RENDERER = "mmdc"
"""mermaid-cli's command; `mlpo graph --png` renders with it when it is installed, never through a web service."""


def cmd_graph(args: argparse.Namespace) -> int:
    """Print a topology as mermaid, write it to a file, or render a PNG with a local mermaid-cli."""
    from mlpo_agents.graphs import build_topology

    try:
        params = dict(json.loads(args.params)) if args.params else {}
    except (json.JSONDecodeError, TypeError, ValueError):
        raise UserError(f"--params {args.params!r}: give a JSON object, e.g. --params '{{\"peers\": 2}}'") from None
    text = build_topology(args.topology, **params).get_graph().draw_mermaid()
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}; render it locally with `{MERMAID_RENDERER} -i {args.out} -o graph.png` "
              "(mermaid-cli) or paste it into any mermaid viewer", file=sys.stderr)
    if args.png:
        renderer = shutil.which(MERMAID_RENDERER)
        if renderer is None:
            raise UserError(
                f"--png {args.png}: no local mermaid renderer (`{MERMAID_RENDERER}`, mermaid-cli) on PATH, and "
                "graphs are never sent to a web service; write the text with --out graph.mmd and render it "
                f"where mermaid-cli is installed (`{MERMAID_RENDERER} -i graph.mmd -o {args.png}`)"
            )
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "graph.mmd"
            source.write_text(text)
            done = subprocess.run([renderer, "-i", str(source), "-o", args.png], capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"{MERMAID_RENDERER} failed to render {args.png}: {done.stderr.strip()[-300:]}")
        print(f"wrote {args.png}", file=sys.stderr)
    if not args.out and not args.png:
        print(text)
    return 0


def _add_task_args(p: argparse.ArgumentParser, limit: int | None) -> None:
    p.add_argument(
        "--task", default="word_problems", help="task name (word_problems, arithmetic, gsm8k, math, bbh, mmlu, csqa, ...)"
    )
    p.add_argument("--split", default=None, help="dataset split (default: the task's test split)")
    p.add_argument("--subset", default=None, help="task subset (a BBH task, an MMLU subject, a difficulty)")
    p.add_argument("--limit", type=int, default=limit, help="number of questions (seeded sample)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for the question sample")
    p.add_argument("--data-dir", default=None, help="local benchmark folder (default: $MLPO_DATA_DIR, else the hub)")
    add_task_option_arg(p)


def add_task_option_arg(p: argparse.ArgumentParser) -> None:
    """The repeatable ``--task-option key=value`` flag (values read as YAML scalars)."""
    p.add_argument("--task-option", action="append", default=None, metavar="KEY=VALUE",
                   help="task loader option, repeatable, e.g. --task-option max_value=20 --task-option ops=+- "
                        "(arithmetic: num_operands, max_value, ops, parentheses)")


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
    traces.add_argument("action", choices=["show", "export", "export-otel"])
    traces.add_argument("--traces", default=DEFAULT_TRACES)
    traces.add_argument("--episode", default=None, action="extend", nargs="+", metavar="ID",
                        help="show the calls of these episodes (id prefixes); export-otel: export only these")
    traces.add_argument("--last", type=int, default=10, help="episodes to list")
    traces.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    traces.add_argument("--out", default=None)
    traces.add_argument("--endpoint", default=None,
                        help="export-otel: OTLP/HTTP collector URL, e.g. http://127.0.0.1:4318 (else --out FILE.jsonl)")
    traces.add_argument("--content", action="store_true", help="export-otel: include prompt and completion text")
    traces.set_defaults(func=cmd_traces)

    graph = sub.add_parser("graph", help="print a topology as mermaid (or write it with --out FILE)")
    graph.add_argument("--topology", default="leader_peers")
    graph.add_argument("--params", default=None, help='builder parameters as JSON, e.g. \'{"peers": 2}\'')
    graph.add_argument("--out", default=None, help="write the mermaid text to this file (e.g. graph.mmd)")
    graph.add_argument("--png", default=None,
                       help=f"render a PNG with a local mermaid-cli (`{MERMAID_RENDERER}`); never uses the network")
    graph.set_defaults(func=cmd_graph)

    for module_name in PLUGGED_COMMANDS:
        importlib.import_module(module_name).add_subcommand(sub)
    return parser


# Modules that add their own subcommand with `add_subcommand(subparsers)`. They import heavy
# dependencies (torch, vllm clients) inside their command functions, so `mlpo --help` stays fast.
PLUGGED_COMMANDS: tuple[str, ...] = (
    "mlpo_agents.evaluate", "mlpo_agents.trainers.loop", "mlpo_agents.trainers.recipe_plan", "mlpo_agents.serve",
    "mlpo_agents.ui",
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mlpo` command."""
    from mlpo_agents.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        args = parser.parse_args(["run", *(argv or [])])
    try:
        with library_warnings(_warnings_log(args), show=bool(getattr(args, "verbose", False))):
            return int(args.func(args) or 0)
    except (UserError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"mlpo {args.command or 'run'}: error: {e}", file=sys.stderr)
        return 2


WARNINGS_LOG = "warnings.log"


def _warnings_log(args: argparse.Namespace) -> Path | None:
    """Where a command's library warnings go: `warnings.log` in its run folder (None: dropped)."""
    if args.command in (None, "run"):
        return Path(args.traces).parent / WARNINGS_LOG
    if args.command == "eval":
        return Path(args.runs_dir) / args.name / WARNINGS_LOG
    if args.command == "train" and getattr(args, "out", None):
        return Path(args.out) / WARNINGS_LOG
    return None


class _LogFile(logging.FileHandler):
    """A log file whose folder is made when the first record arrives (a failed command leaves no folder)."""

    def _open(self) -> Any:
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@contextlib.contextmanager
def library_warnings(log: Path | None, *, show: bool = False) -> Iterator[None]:
    """Send Python warnings (e.g. transformers' FutureWarnings) to `log` instead of the terminal.

    The file is only created when a warning arrives; `show` (--verbose) also prints them to stderr.
    """
    logger = logging.getLogger("py.warnings")
    handlers: list[logging.Handler] = []
    if log is not None:
        handlers.append(_LogFile(log, delay=True, encoding="utf-8"))
    if show:
        handlers.append(logging.StreamHandler(sys.stderr))
    if not handlers:
        handlers.append(logging.NullHandler())  # else logging's last-resort handler prints them anyway
    saved = logger.propagate, logger.level
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
    logger.propagate, logger.level = False, logging.WARNING
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.propagate, logger.level = saved


if __name__ == "__main__":
    sys.exit(main())
