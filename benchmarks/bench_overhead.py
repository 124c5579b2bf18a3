"""Framework overhead per model call versus a bare litellm call to the same scripted provider.

Measures, side by side in one process, the median wall time of:
  bare     litellm.acompletion to the scripted provider (the baseline)
  router   litellm Router.acompletion (what the team config adds: retries, fallbacks)
  client   ModelClient.acomplete: Router + token parsing + one SQLite trace write
  graph    a leader_peers episode (3 peers + leader) through LangGraph, per model call, including the
           episode rows, rewards and trace writes
Overhead = median(x) - median(bare). Target: graph overhead < 2 ms per call.

    python benchmarks/bench_overhead.py --calls 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from mlpo_agents.graphs import build_topology
from mlpo_agents.models import ModelClient
from mlpo_agents.runner import run_episode
from mlpo_agents.tasks.base import Task
from mlpo_agents.testing import ScriptedModel, scripted_team
from mlpo_agents.trace import TraceStore

MESSAGES = [{"role": "user", "content": "What is 17 * 3? Put the answer in <answer></answer>."}]


async def interleaved(paths: dict, rounds: int) -> dict[str, list[float]]:
    """Time every path once per round, in turn, so machine load drifts hit all paths alike."""
    for fn in paths.values():  # warm-up
        for _ in range(5):
            await fn()
    out: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            await fn()
            out[name].append(time.perf_counter() - t0)
    return out


async def main(calls: int, json_path: Path | None = None) -> None:
    import litellm

    model = ScriptedModel("bench", "17 * 3 = 51. <answer>51</answer>")
    team = scripted_team({"leader": model, "peer": model}, params={"peers": 3, "rounds": 1})
    same_request = {"logprobs": True, "extra_body": {"return_token_ids": True}, "temperature": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        store = TraceStore(Path(tmp) / "bench.sqlite")
        client = ModelClient(team, store)
        task = Task(id="b/0", question="What is 17 * 3?", answer="51", kind="math", meta={})
        graph = build_topology("leader_peers", peers=3, rounds=1)
        results = await interleaved(
            {
                "bare": lambda: litellm.acompletion(model="scripted/bench", messages=MESSAGES, **same_request),
                "router": lambda: client.router.acompletion(model="bench", messages=MESSAGES, **same_request),
                "client": lambda: client.acomplete(MESSAGES, role="leader", episode_id="bench"),
                "graph": lambda: run_episode(graph, team, client, store, task, "bench", ("leader",)),
            },
            calls,
        )
        results["graph"] = [t / 4 for t in results["graph"]]  # 4 model calls per episode
    base = statistics.median(results["bare"])
    print(f"{'path':<8} {'median ms/call':>15} {'overhead ms':>12}   ({calls} rounds, interleaved)")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"{name:<8} {med * 1e3:>15.3f} {(med - base) * 1e3:>12.3f}")
    if json_path:
        json_path.write_text(json.dumps({f"{k}_median_ms": statistics.median(v) * 1e3 for k, v in results.items()}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="rounds; each round times every path once")
    parser.add_argument("--json", type=Path, default=None, help="also write the medians here")
    cli = parser.parse_args()
    asyncio.run(main(cli.calls, cli.json))
