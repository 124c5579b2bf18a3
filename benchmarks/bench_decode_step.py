"""Milliseconds per decode step by batch rows: the engine's fast decode path vs transformers' modules.

One engine, the same prompts (GSM8K questions as 3 peers ask them), admitted together and decoded greedily in
this thread; each row count is timed with the fast path (`mlpo_agents/fast_decode.py`) and with it turned
off, alternating, after warm-up steps. A step is one token for every row (sampling and bookkeeping included).
"modules" is the same engine with its fast path off: its q/k/v and gate/up linears are then not prepacked (the
fast path holds the one packed copy), so it is slower than the module path of an engine built with
`MLPO_ENGINE_FAST_DECODE=0`: under that variable the script times that module path alone.

    python benchmarks/bench_decode_step.py --spec smollm2-135m --dtype bfloat16 --rows 1 4 16

`--adapter-rows K` times the fast path twice instead: every row on the base model, and the first K rows under a
LoRA adapter (r 16 on all seven linears, as the trainers make them; random B) beside base rows, the mixed batch
of a training run's rollouts (the trainee's rows beside frozen peers').
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from bench_engine import DATA, build_prompts

from mlpo_agents.engine import LocalEngine, _Request
from mlpo_agents.sampling import SamplingParams


def ms_per_step(
    engine: LocalEngine, prompt_ids: list[list[int]], steps: int, warmup: int = 3, adapted: int = 0
) -> float:
    """Admit the prompts as one wave (the first `adapted` under adapter "bench"), decode `warmup` steps, then
    time `steps` steps; ms per step."""
    engine._reset_batch()
    params = SamplingParams(max_tokens=steps + warmup + 2, temperature=0)
    requests = [
        _Request(ids, params, "bench" if i < adapted else None, concurrent.futures.Future(), samples=[None], remaining=1)
        for i, ids in enumerate(prompt_ids)
    ]
    with torch.inference_mode():
        engine._admit(requests)
        for _ in range(warmup):
            engine._decode_step()
        start = time.perf_counter()
        for _ in range(steps):
            engine._decode_step()
        elapsed = time.perf_counter() - start
        engine._reset_batch()
    return elapsed / steps * 1e3


def time_adapter_rows(engine: LocalEngine, args: argparse.Namespace, prompt_ids: list[list[int]]) -> list[dict]:
    """Per row count: every row on the base model vs the first `--adapter-rows` under a LoRA adapter."""
    results = []
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(args.spec, folder)
        engine._lora.load("bench", folder)
    for rows in args.rows:
        adapted = min(args.adapter_rows, rows)
        times = {}
        for path in ("base", "lora") * 2:  # alternating; the second of each is kept
            times[path] = ms_per_step(engine, prompt_ids[:rows], args.steps, adapted=adapted if path == "lora" else 0)
        results.append({"rows": rows, "adapter_rows": adapted, **{f"{path}_ms": ms for path, ms in times.items()}})
        print(f"{args.spec} {args.dtype} rows {rows:2d}: base {times['base']:6.1f} ms/step, {adapted} under LoRA "
              f"{times['lora']:6.1f} ms/step ({times['lora'] / times['base']:.2f}x)", flush=True)
    return results


def time_paths(engine: LocalEngine, args: argparse.Namespace, prompt_ids: list[list[int]]) -> list[dict]:
    """Per row count: the fast path vs transformers' modules (the modules alone when there is no fast path)."""
    fast, results = engine._lora.fast, []
    for rows in args.rows:
        times = {}
        paths = ("fast", "modules") if fast is not None else ("modules",)  # no fast path: modules alone
        for path in paths * 2:  # alternating; the second of each is kept
            engine._lora.fast = fast if path == "fast" else None
            times[path] = ms_per_step(engine, prompt_ids[:rows], args.steps)
        engine._lora.fast = fast
        results.append({"rows": rows, **{f"{path}_ms": ms for path, ms in times.items()}})
        line = ", ".join(f"{path} {ms:6.1f} ms/step" for path, ms in times.items())
        ratio = f" ({times['modules'] / times['fast']:.2f}x)" if "fast" in times else ""
        print(f"{args.spec} {args.dtype} rows {rows:2d}: {line}{ratio}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--adapter-rows", type=int, default=0, help="K: time base rows vs K adapter rows + base rows")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    prompts = build_prompts(max(args.rows), DATA)
    engine = LocalEngine(args.spec, dtype=args.dtype, max_batch_size=max(32, *args.rows))
    engine.close()  # timed here, in this thread
    engine.eos_token_ids = frozenset()  # every row decodes every timed step
    prompt_ids = [engine.encode_messages(m) for m in prompts]
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    if args.adapter_rows:
        results = time_adapter_rows(engine, args, prompt_ids)
    else:
        results = time_paths(engine, args, prompt_ids)
    print(f"load average after: {os.getloadavg()[0]:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"spec": args.spec, "dtype": args.dtype, "steps": results}))


def save_adapter(spec: str, folder: str, rank: int = 16) -> None:
    """A LoRA adapter of `spec` on its seven linears with seeded random B (so it changes every adapted row)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from mlpo_agents import zoo
    from mlpo_agents.fast_decode import LINEARS
    from mlpo_agents.testing import save_random_adapter

    model = AutoModelForCausalLM.from_pretrained(zoo.model_folder(spec), dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LINEARS))
    save_random_adapter(folder, model, config, seed=0, scale=0.01)


if __name__ == "__main__":
    main()
