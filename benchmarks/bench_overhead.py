"""Framework overhead per model call versus a bare litellm call to the same scripted provider.

Measures, side by side in one process and interleaved, the median wall time of:
  bare          litellm.acompletion to the scripted provider (the baseline)
  router        litellm Router.acompletion as ModelClient builds it (the project's defaults)
  router-lean   the same Router without its usage tracking (`router_usage_tracking: false` and
                `disable_cooldowns: true`, see docs/teams.md "What the Router costs")
  client        ModelClient.acomplete: Router + token parsing + one SQLite trace write
  graph         a leader_peers episode (3 peers + leader) through LangGraph, per model call, including the
                episode rows, rewards and trace writes
Each timing includes the background work the call leaves behind (litellm's success logging and the
Router's usage callbacks run as tasks after the call returns): the loop is drained inside the timed
window, so no path is billed for another's logging. Only the Router whose path is timed has its
callbacks in litellm's global lists at that moment, as in a process with one client.
Then our own code's split: client path = client - router, graph path = graph - client.

    python benchmarks/bench_overhead.py --calls 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mlpo_agents.graphs import build_topology
from mlpo_agents.models import ModelClient, _import_litellm
from mlpo_agents.runner import run_episode
from mlpo_agents.tasks.base import Task
from mlpo_agents.testing import ScriptedModel, scripted_team
from mlpo_agents.trace import TraceStore

litellm = _import_litellm()  # as ModelClient imports it: the bundled cost map, no download
from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is 17 * 3? Put the answer in <answer></answer>."}]
CALLBACK_LISTS = ("success_callback", "_async_success_callback", "failure_callback", "_async_failure_callback")
TimedPath = tuple[Callable[[], Awaitable[Any]], Any]
"""(call, the Router whose callbacks stay registered while it runs; None: no Router's)."""


async def settle(before: set[asyncio.Task]) -> None:
    """Wait for the tasks a call left behind and for litellm's logging worker to run what they queued."""
    while True:
        keep = {asyncio.current_task(), getattr(GLOBAL_LOGGING_WORKER, "_worker_task", None)}  # the worker loop stays
        pending = [t for t in asyncio.all_tasks() if t not in before and t not in keep and not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        await GLOBAL_LOGGING_WORKER.flush()
        if not pending:
            return


def callbacks_of(router: Any) -> dict[str, list[Any]]:
    """litellm's global callback lists with only `router`'s Router callbacks (plus any that are no Router's)."""

    def kept(cb: Any) -> bool:
        owner = getattr(cb, "__self__", None)
        return owner is router or not isinstance(owner, litellm.Router)

    return {name: [cb for cb in getattr(litellm, name) if kept(cb)] for name in CALLBACK_LISTS}


async def interleaved(paths: dict[str, TimedPath], rounds: int) -> dict[str, list[float]]:
    """Time every path once per round, in turn, so machine load drifts hit all paths alike."""
    views = {name: callbacks_of(router) for name, (_, router) in paths.items()}

    async def run(name: str) -> float:
        for key, value in views[name].items():
            setattr(litellm, key, list(value))
        before = set(asyncio.all_tasks())
        t0 = time.perf_counter()
        await paths[name][0]()
        await settle(before)
        return time.perf_counter() - t0

    for name in paths:  # warm-up
        for _ in range(5):
            await run(name)
    out: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name in paths:
            out[name].append(await run(name))
    return out


async def main(calls: int, json_path: Path | None = None) -> None:
    model = ScriptedModel("bench", "17 * 3 = 51. <answer>51</answer>")
    team = scripted_team({"leader": model, "peer": model}, params={"peers": 3, "rounds": 1})
    lean_team = team.model_copy(update={
        "router_usage_tracking": False, "router_settings": {**team.router_settings, "disable_cooldowns": True},
    })
    same_request = {"logprobs": True, "extra_body": {"return_token_ids": True}, "temperature": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        store = TraceStore(Path(tmp) / "bench.sqlite")
        client = ModelClient(team, store)
        lean = ModelClient(lean_team).router
        task = Task(id="b/0", question="What is 17 * 3?", answer="51", kind="math", meta={})
        graph = build_topology("leader_peers", peers=3, rounds=1)
        results = await interleaved(
            {
                "bare": (lambda: litellm.acompletion(model="scripted/bench", messages=MESSAGES, **same_request), None),
                "router": (lambda: client.router.acompletion(model="bench", messages=MESSAGES, **same_request),
                           client.router),
                "router-lean": (lambda: lean.acompletion(model="bench", messages=MESSAGES, **same_request), lean),
                "client": (lambda: client.acomplete(MESSAGES, role="leader", episode_id="bench"), client.router),
                "graph": (lambda: run_episode(graph, team, client, store, task, "bench", ("leader",)),
                          client.router),
            },
            calls,
        )
        results["graph"] = [t / 4 for t in results["graph"]]  # 4 model calls per episode
    med = {name: statistics.median(times) * 1e3 for name, times in results.items()}
    mean = {name: statistics.fmean(times) * 1e3 for name, times in results.items()}  # shows rare stalls too
    print(f"{'path':<12} {'median ms/call':>15} {'over bare ms':>13} {'mean ms/call':>13}   ({calls} rounds, interleaved)")
    for name, value in med.items():
        print(f"{name:<12} {value:>15.3f} {value - med['bare']:>13.3f} {mean[name]:>13.3f}")
    split = {
        "router over bare (project defaults)": med["router"] - med["bare"],
        "router-lean over bare": med["router-lean"] - med["bare"],
        "our client path (client - router)": med["client"] - med["router"],
        "our graph path (graph - client)": med["graph"] - med["client"],
        "our code in all (graph - router)": med["graph"] - med["router"],
    }
    print()
    for label, value in split.items():
        print(f"{label:<38} {value:>7.3f} ms/call")
    if json_path:
        json_path.write_text(json.dumps({**{f"{k}_median_ms": v for k, v in med.items()},
                                         **{f"{k}_mean_ms": v for k, v in mean.items()},
                                         **{k: v for k, v in split.items()}}, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="rounds; each round times every path once")
    parser.add_argument("--json", type=Path, default=None, help="also write the medians here")
    cli = parser.parse_args()
    asyncio.run(main(cli.calls, cli.json))
