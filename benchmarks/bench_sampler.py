"""The engine's top-p sampler against a full vocabulary sort, side by side: sampled generation tok/s.

Every team samples at top_p < 1 (0.95 in the shipped teams). The engine used to find each row's nucleus by
sorting its whole vocabulary every decode step (as transformers' `TopPLogitsWarper` does): 49k entries a
row for SmolLM2, 152k for Qwen2.5-Coder. It now looks among the row's 64 most likely tokens first
(`mlpo_agents.sampling.NUCLEUS_CANDIDATES`) and sorts only a row whose candidates hold less than top_p.
Both find the same nucleus (`tests/test_sampling.py`; tokens of equal probability, frequent with bf16 logits,
may be ranked differently, so the token counts can differ a little). This measures what it is worth end to
end: the same engine and requests (3 peers x N episodes of GSM8K prompts, as `bench_engine.py`), sampled at
`--temperature` / `--top-p` with fixed seeds, once with each sampler, alternating, `--rounds` times.
It also reports how often a row needed the full sort. "ours" is the sampler the engine runs: the compiled one
(`kernels.sample_rows`) where it builds; "torch_ops" is the same sampler through torch ops (no compiler).

    python benchmarks/bench_sampler.py --spec qwen2.5-coder-0.5b --dtype bfloat16 --requests 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from bench_engine import DATA, build_prompts

from mlpo_agents import engine as engine_module
from mlpo_agents import sampling
from mlpo_agents.engine import LocalEngine
from mlpo_agents.sampling import SamplingParams


def full_sort_sample_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator],
    processed_logprobs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the sampler as it was, every top-p row's nucleus found by sorting the vocabulary."""
    raw = torch.log_softmax(logits, dim=-1)
    tokens = raw.argmax(dim=-1)
    sampled = [j for j, p in enumerate(params) if p.temperature > 0]
    if sampled:
        idx = torch.tensor(sampled)
        temp = torch.tensor([params[j].temperature for j in sampled], dtype=logits.dtype)
        probs = torch.log_softmax(logits[idx] / temp[:, None], dim=-1).exp()
        uniforms = torch.stack([torch.rand((), generator=generators[j]) for j in sampled])
        probs, order = probs.sort(dim=-1, descending=True)
        top_p = torch.tensor([params[j].top_p for j in sampled], dtype=probs.dtype)
        probs = probs * ((probs.cumsum(dim=-1) - probs) < top_p[:, None])
        cdf = probs.cumsum(dim=-1)
        picks = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None]).clamp_(max=cdf.shape[-1] - 1)
        tokens[idx] = order.gather(1, picks).squeeze(1)
    return tokens, raw.gather(1, tokens[:, None]).squeeze(1)


def torch_ops_sample_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator],
    processed_logprobs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our sampler through torch ops: what runs where the compiled kernels cannot be built."""
    load, sampling.kernels.load = sampling.kernels.load, lambda: None  # type: ignore[assignment]
    try:
        return sampling.sample_tokens(logits, params, generators, processed_logprobs)
    finally:
        sampling.kernels.load = load  # type: ignore[assignment]


class FallbackCounter:
    """Counts rows the current sampler had to sort in full (its nucleus reached past the candidates)."""

    def __init__(self) -> None:
        self.rows = self.fallbacks = 0
        self._sort = sampling._top_p_tokens

    def __call__(self, scaled: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        k = min(sampling.NUCLEUS_CANDIDATES, scaled.shape[-1])
        self.rows += scaled.shape[0]
        self.fallbacks += int((scaled.topk(k, dim=-1).values.exp().sum(dim=-1) < top_p).sum())
        return self._sort(scaled, top_p, uniforms)


def timed(engine: LocalEngine, prompts: list, max_tokens: int, temperature: float, top_p: float) -> tuple[int, float]:
    """All requests at once, seeded: (tokens, wall seconds)."""
    start = time.perf_counter()
    futures = [engine.submit(m, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=i)
               for i, m in enumerate(prompts)]  # fmt: skip
    tokens = sum(len(f.result().samples[0].token_ids) for f in futures)
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--rounds", type=int, default=2, help="each sampler runs this many times, alternating")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()

    prompts = build_prompts(args.requests, args.data)
    engine = LocalEngine(args.spec, dtype=args.dtype, max_batch_size=max(32, args.requests))
    engine.generate(prompts[0], max_tokens=4, temperature=args.temperature, top_p=args.top_p)  # warm-up
    samplers = {"ours": sampling.sample_tokens, "torch_ops": torch_ops_sample_tokens, "full_sort": full_sort_sample_tokens}
    rates: dict[str, list[float]] = {name: [] for name in samplers}
    load_before = os.getloadavg()[0]
    counter = FallbackCounter()
    try:
        for _ in range(args.rounds):
            for name, sampler in samplers.items():
                engine_module.sample_tokens = sampler  # type: ignore[assignment]
                tokens, seconds = timed(engine, prompts, args.max_tokens, args.temperature, args.top_p)
                rates[name].append(tokens / seconds)
                print(f"{name:<10} {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s", flush=True)
        load_after = os.getloadavg()[0]
        engine_module.sample_tokens = samplers["torch_ops"]  # the torch path finds every nucleus via _top_p_tokens
        sampling._top_p_tokens = counter  # type: ignore[assignment]
        timed(engine, prompts, args.max_tokens, args.temperature, args.top_p)  # untimed: count full sorts
    finally:
        engine_module.sample_tokens, sampling._top_p_tokens = samplers["ours"], counter._sort  # type: ignore[assignment]
        engine.close()
    record = {
        "spec": args.spec, "dtype": args.dtype, "requests": args.requests, "top_p": args.top_p,
        "temperature": args.temperature, "ours_tok_s": statistics.median(rates["ours"]),
        "full_sort_tok_s": statistics.median(rates["full_sort"]), "torch_ops_tok_s": statistics.median(rates["torch_ops"]),
        "fallback_rows": counter.fallbacks, "nucleus_rows": counter.rows,
        "load_before": load_before, "load_after": load_after,
    }  # fmt: skip
    print(f"ours / full sort: {record['ours_tok_s'] / record['full_sort_tok_s']:.2f}x, ours / torch ops: "
          f"{record['ours_tok_s'] / record['torch_ops_tok_s']:.2f}x (medians of {args.rounds}); "
          f"{counter.fallbacks} of {counter.rows} nucleus rows sorted in full")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(record))


if __name__ == "__main__":
    main()
