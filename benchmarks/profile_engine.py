"""Where LocalEngine's time goes: drive the engine loop in this thread under torch.profiler, per dtype.

The worker thread is bypassed (requests are admitted and decoded synchronously here) so the profiler and
the timings see one thread; `--compare-worker` also times the same requests through the real worker
thread, to tell a threading effect from a per-step cost. Compare dtypes side by side in one process:
    python benchmarks/profile_engine.py --dtype float32 bfloat16 --max-tokens 32 --threads 1
"""

from __future__ import annotations

import argparse
import concurrent.futures
import time

import torch
from bench_engine import DATA, bench_engine, build_prompts
from torch.profiler import ProfilerActivity, profile

from mlpo_agents.engine import LocalEngine, _Request
from mlpo_agents.sampling import SamplingParams


def run_in_this_thread(engine: LocalEngine, prompt_ids: list[list[int]], max_tokens: int) -> int:
    """Admit every prompt at once, decode until all finish, here; returns the number of tokens."""
    engine._reset_batch()
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    requests = [
        _Request(ids, params, None, concurrent.futures.Future(), samples=[None], remaining=1)
        for ids in prompt_ids
    ]
    with torch.inference_mode():
        engine._admit(requests)
        while engine._rows:
            engine._decode_step()
    return sum(len(r.future.result().samples[0].token_ids) for r in requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--spec", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", type=int, default=15, help="profiler table rows")
    parser.add_argument("--compare-worker", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = build_prompts(args.requests, DATA)
    for dtype in args.dtype:
        engine = LocalEngine(
            args.spec, dtype=dtype, max_batch_size=max(32, args.requests), num_threads=args.threads
        )
        engine.generate(prompts[0], max_tokens=2, temperature=0)  # warm-up in the worker
        if args.compare_worker:
            tokens, seconds, cpu = bench_engine(engine, prompts, args.max_tokens)
            print(
                f"{dtype} worker thread: {tokens / seconds:.1f} tok/s, {cpu / seconds:.2f} cores", flush=True
            )
        engine.close()
        prompt_ids = [engine.encode_messages(m) for m in prompts]
        run_in_this_thread(engine, prompt_ids, 2)  # warm-up here
        start, cpu_start = time.perf_counter(), time.process_time()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            tokens = run_in_this_thread(engine, prompt_ids, args.max_tokens)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        print(
            f"{dtype} this thread (profiled): {tokens / seconds:.1f} tok/s, {cpu / seconds:.2f} cores",
            flush=True,
        )
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows), flush=True)


if __name__ == "__main__":
    main()
