"""Re-evaluate a finished MALT run with the paper's inference: a majority vote over sampled G -> V -> R chains.

    python examples/malt_vote.py --run runs/malt_learning --eval-chains 3 --out runs/malt_vote

A MALT run (`examples/malt_learning.py`) evaluates with one greedy chain by default, because three sampled
chains triple the cost. This script takes the run's team, task, seed and trained adapters (`--run`) and
measures the untrained team and the trained team (every role routed to its adapter) on the same held-out
questions with `--eval-chains` chains at `--eval-temperature` (default: the team's own), majority vote:
strict answer rule, 95% Wilson intervals, McNemar's exact test on the per-question outcomes, the lenient
figure beside it. The run folder is only read; traces, `results.json` and `results.md` go to `--out`.
Interrupted, the same command continues: finished episodes are read back from `--out`'s trace store.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any


def load_run_config(run: Path) -> dict[str, Any]:
    """The MALTConfig fields a finished MALT run recorded, with a clear error when `run` is not one."""
    path = run / "config.json"
    if not path.is_file():
        raise SystemExit(f"{run} has no config.json: pass the folder of a MALT run (examples/malt_learning.py --out)")
    fields = json.loads(path.read_text())
    missing = [f for f in ("team", "task", "roles", "adapter_per_role") if f not in fields]
    if missing:
        raise SystemExit(f"{path} is not a MALT run's config (no {', '.join(missing)})")
    return fields


def run_config_and_team(run: Path, **overrides: Any) -> tuple[Any, Any]:
    """The MALTConfig a finished run recorded (with `overrides`) and the team it ran (its own team.yaml)."""
    from mlpo_agents.config import load_team
    from mlpo_agents.trainers.malt import MALTConfig

    known = {f.name for f in dataclasses.fields(MALTConfig)}
    config = MALTConfig(**{**{k: v for k, v in load_run_config(run).items() if k in known}, **overrides})
    own_team = run / "team.yaml"  # the run writes its team beside its config; the recorded path is relative
    return config, load_team(str(own_team) if own_team.is_file() else config.team)


def adapter_folders(run: Path, units: dict[str, tuple[str, ...]]) -> dict[str, Path]:
    """Each trained adapter's folder in `run`, refusing a run whose training did not finish."""
    folders = {unit: run / "adapters" / unit for unit in units}
    absent = [str(p) for p in folders.values() if not (p / "adapter_config.json").is_file()]
    if absent:
        raise SystemExit(f"no trained adapter in {', '.join(absent)}: finish the run first (malt_learning.py --resume)")
    return folders


def vote(run: Path, out: Path, chains: int, temperature: float | None = None, questions: int | None = None,
         concurrency: int = 16) -> dict[str, Any]:
    """Evaluate run `run`'s untrained and trained team (majority vote of `chains`) into `out`; the results."""
    from mlpo_agents.models import ModelClient
    from mlpo_agents.report import paired_row
    from mlpo_agents.trace import TraceStore
    from mlpo_agents.trainers.malt import evaluate, route, units_of

    if out.resolve() == run.resolve():
        raise SystemExit(f"--out {out} is the run folder: give this evaluation its own folder (the run is only read)")
    config, team = run_config_and_team(run, eval_chains=chains, eval_temperature=temperature,
                                       **({} if questions is None else {"eval_questions": questions}),
                                       concurrency=concurrency, out=str(out), resume=True)  # fmt: skip
    units = units_of(config)
    folders = adapter_folders(run, units)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict[str, Any] = {}
    with TraceStore(out / "traces.sqlite") as store:
        client = ModelClient(team, store)
        for label in ("before", "after"):
            if label == "after":
                route(client, folders, units, "vote")
            print(f"[malt-vote] {label}: {config.eval_questions} questions x {chains} chains", flush=True)
            results[label] = evaluate(config, team, client, store, label)
    before, after = results["before"], results["after"]
    row = paired_row(before["team_correct"], after["team_correct"],
                     before_lenient=before["lenient_accuracy"], after_lenient=after["lenient_accuracy"])  # fmt: skip
    return {
        "run": str(run),
        "seed": config.seed,
        "wall_minutes": round((time.perf_counter() - start) / 60, 1),
        "rows": {"team": row},
        "roles": {label: r["roles"] for label, r in results.items()},
        "eval": {"chains": chains, "temperature": temperature, "questions": config.eval_questions,
                 "task": config.task, "task_options": config.task_options},
        "wall_s": {label: r["wall_s"] for label, r in results.items()},
        "failed": {label: r["failed"] for label, r in results.items()},
        "adapters": {unit: str(p) for unit, p in folders.items()},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished MALT run folder")
    parser.add_argument("--out", type=Path, required=True, help="where this evaluation's traces and results go")
    parser.add_argument("--eval-chains", type=int, default=3, help="chains per question, majority vote (paper: 3)")
    parser.add_argument("--eval-temperature", type=float, default=None, help="every role's temperature (default: the team's)")
    parser.add_argument("--eval-questions", type=int, default=None, help="held-out questions (default: the run's)")
    parser.add_argument("--concurrency", type=int, default=16, help="episodes in flight")
    parser.add_argument(
        "--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="the in-process engine's dtype"
    )
    args = parser.parse_args()
    os.environ["MLPO_ENGINE_DTYPE"] = args.dtype
    from mlpo_agents.report import command_line, paired_markdown, write_learning_results
    from mlpo_agents.trainers.malt_eval import roles_markdown

    summary = {"command": command_line("examples/malt_vote.py", vars(args)),
               **vote(args.run, args.out, args.eval_chains, args.eval_temperature, args.eval_questions,
                      args.concurrency)}  # fmt: skip
    temperature = "the team's temperature" if args.eval_temperature is None else f"T {args.eval_temperature}"
    title = (f"MALT run {args.run}: majority vote of {args.eval_chains} chain(s) at {temperature}, "
             f"{summary['wall_minutes']} min, seed {summary['seed']}")  # fmt: skip
    table = paired_markdown(title, summary["rows"], label="team")
    roles = roles_markdown(summary["roles"]["before"], summary["roles"]["after"])
    write_learning_results(args.out, summary, f"{table}\n\n{roles}\n")


if __name__ == "__main__":
    main()
