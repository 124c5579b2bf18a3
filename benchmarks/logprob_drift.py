"""How far a bf16 engine samples from the fp32 policy it stands in for: bf16 completions scored by the fp32 model.

A trainer that samples rollouts from a bf16 engine (`examples/mlpo_learning.py --engine-dtype bfloat16`) trains
the fp32 weights on samples of their bf16 copy. This draws `--requests` completions from the bf16 engine (GSM8K
questions as 3 peers ask them, temperature `--temperature`), scores the same tokens with the fp32 model in one
forward each, and prints the per-token difference of the raw (T = 1) logprobs: mean and quantiles of its size,
and its mean (the bf16 minus the fp32 logprob of the sampled tokens).

    python benchmarks/logprob_drift.py --spec smollm2-135m --requests 24 --max-tokens 96
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from bench_engine import DATA, build_prompts

from mlpo_agents import zoo
from mlpo_agents.engine import LocalEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    engine = LocalEngine(args.spec, dtype="bfloat16")
    model, _ = zoo.resolve(args.spec, dtype=torch.float32)
    prompts = build_prompts(args.requests, DATA)
    futures = [
        engine.submit(m, max_tokens=args.max_tokens, temperature=args.temperature, seed=i)
        for i, m in enumerate(prompts)
    ]
    diffs: list[float] = []
    for future in futures:
        result = future.result()
        sample, prompt = result.samples[0], result.prompt_token_ids
        ids = torch.tensor([prompt + sample.token_ids])
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # (T, V)
        fp32 = torch.log_softmax(logits, -1).gather(1, torch.tensor(sample.token_ids)[:, None]).squeeze(1)
        diffs += (torch.tensor(sample.logprobs) - fp32).tolist()
    engine.close()
    size = sorted(abs(d) for d in diffs)
    summary = {
        "spec": args.spec,
        "tokens": len(diffs),
        "abs_mean": statistics.fmean(size),
        "abs_median": statistics.median(size),
        "abs_p99": size[int(0.99 * (len(size) - 1))],
        "abs_max": size[-1],
        "mean": statistics.fmean(diffs),
    }
    print(
        f"{args.spec}, {summary['tokens']} tokens of {args.requests} bf16 completions scored by the fp32 model: "
        f"|logp_bf16 - logp_fp32| mean {summary['abs_mean']:.4f}, median {summary['abs_median']:.4f}, "
        f"p99 {summary['abs_p99']:.3f}, max {summary['abs_max']:.3f}; mean difference {summary['mean']:+.4f}"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
