"""Throughput of LocalEngine (continuous batching) vs one-at-a-time ``model.generate`` on SmolLM2-135M.

12 concurrent requests (3 peers x 4 episodes) built from GSM8K test questions, greedy, max_tokens 128.
Usage: python benchmarks/bench_engine.py [--dtype float32 [bfloat16]] [--requests 12] [--max-tokens 128]
(``--dtype float32 bfloat16`` times both engines and both static batches side by side in one process.)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from mlpo_agents import zoo
from mlpo_agents.engine import LocalEngine

DATA = (
    Path(os.environ.get("MLPO_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
    / "gsm8k"
    / "test.jsonl"
)
PEER_STYLES = ("Solve step by step.", "Answer briefly, then check your work.", "Explain your reasoning.")


def build_prompts(n_requests: int, data: Path) -> list[list[dict[str, str]]]:
    """n_requests chat prompts: 3 peers x (n_requests / 3) episodes, each with a different question."""
    rows = [json.loads(line) for line in data.read_text().splitlines()[:n_requests]]
    return [
        [
            {"role": "system", "content": f"You are peer {i % 3 + 1}. {PEER_STYLES[i % 3]}"},
            {"role": "user", "content": row["question"] + " Put the final number in <answer></answer>."},
        ]
        for i, row in enumerate(rows)
    ]


def bench_generate(model, tokenizer, prompts, max_tokens: int) -> tuple[int, float, float]:
    """Plain transformers generate, one request at a time: (tokens, wall seconds, CPU seconds)."""
    total, start, cpu_start = 0, time.perf_counter(), time.process_time()
    for messages in prompts:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        total += out.shape[1] - ids["input_ids"].shape[1]
    return total, time.perf_counter() - start, time.process_time() - cpu_start


def bench_static_batch(model, tokenizer, prompts, max_tokens: int) -> tuple[int, float, float]:
    """The reference a continuous-batching engine competes with: one left-padded `generate` of all prompts."""
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    tokenizer.padding_side = side
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return int((out[:, batch["input_ids"].shape[1] :] != pad).sum()), elapsed, cpu


def bench_engine(engine: LocalEngine, prompts, max_tokens: int) -> tuple[int, float, float]:
    """All requests submitted at once to the continuous-batching engine: (tokens, wall s, CPU s)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    futures = [engine.submit(m, max_tokens=max_tokens, temperature=0) for m in prompts]
    results = [f.result() for f in futures]
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return sum(len(r.samples[0].token_ids) for r in results), elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
        help="one or more: several are timed side by side in this process (engines first, then static batches)",
    )  # fmt: skip
    parser.add_argument("--spec", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument(
        "--baseline-requests", type=int, default=None, help="time the baseline on the first N only"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads (engine worker and baseline)"
    )
    args = parser.parse_args()

    prompts = build_prompts(args.requests, args.data)
    by_dtype: dict[str, dict[str, float]] = {}
    # The first dtype's numbers stay at the top level (what run_all.py reads); all are under "by_dtype".
    record: dict[str, Any] = {"dtype": args.dtype[0], "by_dtype": by_dtype}
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for dtype in args.dtype:
        engine = LocalEngine(
            args.spec, dtype=dtype, max_batch_size=max(32, args.requests), num_threads=args.threads
        )
        engine.generate(prompts[0], max_tokens=4, temperature=0)  # warm-up
        tokens, seconds, cpu = bench_engine(engine, prompts, args.max_tokens)
        engine.close()
        by_dtype[dtype] = {"engine_tok_s": tokens / seconds, "engine_tok_per_cpu_s": tokens / cpu}
        print(
            f"engine   {dtype}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s "
            f"({args.requests} concurrent); {tokens / cpu:.1f} tok per CPU-second, {cpu / seconds:.2f} cores",
            flush=True,
        )
    if {"float32", "bfloat16"} <= set(by_dtype):
        speedup = by_dtype["bfloat16"]["engine_tok_s"] / by_dtype["float32"]["engine_tok_s"]
        print(f"engine bfloat16 / engine float32: {speedup:.2f}x", flush=True)
    record |= by_dtype[args.dtype[0]]
    if args.json:
        args.json.write_text(json.dumps(record))
    if args.skip_baseline:
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    for dtype in args.dtype:
        model, tokenizer = zoo.resolve(args.spec, dtype=dtype)
        bench_static_batch(model, tokenizer, prompts[:2], 2)  # warm-up
        st_tokens, st_seconds, st_cpu = bench_static_batch(model, tokenizer, prompts, args.max_tokens)
        static_tps, engine_tps = st_tokens / st_seconds, by_dtype[dtype]["engine_tok_s"]
        by_dtype[dtype]["static_batch_tok_s"] = static_tps
        print(
            f"generate {dtype} static batch of {len(prompts)}: {st_tokens} tokens in {st_seconds:.1f} s = "
            f"{static_tps:.1f} tok/s, {st_cpu / st_seconds:.2f} cores "
            f"(engine / static batch: {engine_tps / static_tps:.2f}x)",
            flush=True,
        )
    record |= by_dtype[args.dtype[0]]
    if args.json:
        args.json.write_text(json.dumps(record))
    print(f"load average after: {os.getloadavg()[0]:.2f}", flush=True)
    model, tokenizer = zoo.resolve(args.spec, dtype="float32")
    bench_generate(model, tokenizer, prompts[:1], 4)  # warm-up
    base_tokens, base_seconds, base_cpu = bench_generate(
        model, tokenizer, prompts[: args.baseline_requests], args.max_tokens
    )
    base_tps = base_tokens / base_seconds
    print(
        f"generate float32 one at a time: {base_tokens} tokens in {base_seconds:.1f} s = {base_tps:.1f} tok/s; "
        f"{base_tokens / base_cpu:.1f} tok per CPU-second",
        flush=True,
    )
    for dtype, numbers in by_dtype.items():
        print(
            f"ratio engine({dtype}) / generate(float32, 1 stream): {numbers['engine_tok_s'] / base_tps:.2f}x wall, "
            f"{numbers['engine_tok_per_cpu_s'] / (base_tokens / base_cpu):.2f}x per CPU-second",
            flush=True,
        )
    record["one_stream_tok_s"] = base_tps
    if args.json:
        args.json.write_text(json.dumps(record))


if __name__ == "__main__":
    main()
