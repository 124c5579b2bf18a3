"""Throughput and latency of the team served as an OpenAI-compatible endpoint (`mlpo serve --app`).

Starts the app in-process on a free loopback port and sends chat completions from 1, 8 and 32
concurrent clients (the `openai` async client), each client sending requests back to back. Reports
requests/s and p50/p95 latency per concurrency. On the tiny model (the default) this measures the
server's own overhead (HTTP, episode bookkeeping, trace writes) plus a very cheap model; pass a real
team (`--team default`) to measure a deployment.

    nice -n 19 .venv/bin/python benchmarks/bench_app.py --team tiny --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path


async def _load(url: str, model: str, clients: int, requests: int) -> dict[str, float]:
    from openai import AsyncOpenAI

    api = AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    latencies: list[float] = []
    todo = iter(range(requests))

    async def one_client() -> None:
        for i in todo:
            start = time.perf_counter()
            await api.chat.completions.create(model=model, messages=[
                {"role": "user", "content": f"What is {i % 17} + {i % 5}?"}])
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    wall = time.perf_counter() - start
    await api.close()
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / wall,
        "p50_s": statistics.median(ordered),
        "p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
    }


def main() -> None:
    """Run the benchmark and print one JSON line per concurrency."""
    from mlpo_agents import Team
    from mlpo_agents.app import AppServer, create_app

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--team", default="tiny", help="team to serve (tiny: the server's own overhead)")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--warmup", type=int, default=4, help="requests before measuring (engine load)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        team = Team.load(args.team, traces=Path(tmp) / "bench.sqlite")
        with AppServer(create_app([team])) as server:
            asyncio.run(_load(server.url, team.name, 1, args.warmup))
            for clients in (int(c) for c in args.clients.split(",")):
                print(json.dumps({"team": team.name, **{k: round(v, 4) for k, v in asyncio.run(
                    _load(server.url, team.name, clients, args.requests)).items()}}), flush=True)
        team.close()


if __name__ == "__main__":
    main()
