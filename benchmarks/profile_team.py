"""Where the in-process engine's worker spends the team workload (`bench_vllm.py`'s local backend), by method.

Wraps the engine's per-step methods with wall-clock timers, runs the default team (1 leader + 3 peers) on
arithmetic episodes exactly as `bench_vllm.py --backends local` does, and prints each method's total,
calls and time per call: prefill forwards vs decode forwards, the cache rebuilds when rows join (merge) or
finish (drop rows), sampling. Nested rows are part of the row above them.

    python benchmarks/profile_team.py --model smollm2-135m --dtype bfloat16 --episodes 32
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import bench_vllm

from mlpo_agents import engine

TIMED = (  # (owner, attribute, label); indented labels are inside the one above
    (engine.LocalEngine, "_admit", "admit: prefill, merge, first token"),
    (engine.LocalEngine, "_merge", "  merge (cache rebuild as rows join)"),
    (engine.LocalEngine, "_decode_step", "decode step"),
    (engine.LocalEngine, "_sample_and_advance", "  sample and advance"),
    (engine, "sample_tokens", "    sample_tokens"),
    (engine.LocalEngine, "_drop_rows", "    drop rows (cache rebuild as rows finish)"),
    (engine.LocalEngine, "_forward", "forward, prefill and decode"),
)


def timed(fn: Callable[..., Any], label: str, totals: collections.Counter, calls: collections.Counter) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - start
            calls[label] += 1

    return wrapper


def shape_probe(decode_step: Callable[..., Any], shapes: list[tuple[int, int, int]]) -> Callable:
    """Wrap `_decode_step` to record (rows, KV columns, real tokens) of each step's batch before it runs."""

    def wrapper(self: Any) -> Any:
        rows, columns = self._mask.shape
        shapes.append((rows, columns + 1, int(self._mask.sum()) + rows))  # the step appends one column per row
        return decode_step(self)

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    totals: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for owner, name, label in TIMED:
        setattr(owner, name, timed(getattr(owner, name), label, totals, calls))
    shapes: list[tuple[int, int, int]] = []
    engine.LocalEngine._decode_step = shape_probe(engine.LocalEngine._decode_step, shapes)
    sys.argv = ["bench_vllm.py", "--model", args.model, "--episodes", str(args.episodes), "--concurrency",
                str(args.concurrency), "--max-tokens", str(args.max_tokens), "--dtype", args.dtype,
                "--backends", "local"]  # fmt: skip
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    start = time.perf_counter()
    bench_vllm.main()
    print(f"\nwall {time.perf_counter() - start:.1f} s including the warm-up episode and model load")
    for _, _, label in TIMED:
        if calls[label]:
            print(f"{label:<46} {totals[label]:7.2f} s {calls[label]:6d} calls {totals[label] / calls[label] * 1e3:8.2f} ms each")
    if shapes:
        steps = len(shapes)
        rows = sum(s[0] for s in shapes) / steps
        columns = sum(s[1] for s in shapes) / steps
        real = sum(s[2] for s in shapes) / sum(s[0] * s[1] for s in shapes)
        print(f"decode batches: {rows:.1f} rows x {columns:.0f} KV columns on average; real tokens "
              f"{real:.0%} of the K/V the attention reads (the rest is left padding)")


if __name__ == "__main__":
    main()
