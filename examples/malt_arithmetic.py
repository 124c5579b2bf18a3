"""MALT on arithmetic with SmolLM2-135M on CPU: gvr team accuracy before and after training.

    python examples/malt_arithmetic.py --questions 8 --branching 2 --eval-questions 12 --max-tokens 96 --seed 0

Expands `questions` train trees (n = `branching` samples per role), trains one LoRA adapter per role
(SFT on positives, then DPO on sibling pairs), and evaluates the team with `eval_chains` chains and a
majority vote on held-out test questions before and after. Everything lands in `--out`
(`runs/malt_arithmetic/` by default): `results.json` (accuracies with Wilson 95% intervals, data counts,
command, seed, wall time), `metrics.jsonl`, TensorBoard logs, traces and adapters. `--resume` continues
an interrupted run. The team is `gvr.yaml` with shorter generation budgets to fit the CPU.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import yaml

from mlpo_agents.trainers.malt import MALTConfig, train


def team_yaml(max_tokens: int, temperature: float) -> dict:
    """The gvr team on SmolLM2-135M (in-process engine), every role trainable."""
    sampling = {"temperature": temperature, "top_p": 0.95, "max_tokens": max_tokens}
    return {
        "name": "gvr-smollm2",
        "topology": "gvr",
        "params": {"chains": 1},
        "model_list": [{"model_name": "smollm2", "litellm_params": {"model": "local/smollm2-135m"}}],
        "router_settings": {"num_retries": 1, "timeout": 1800},
        "roles": {
            role: {"model": "smollm2", "trainable": True, "sampling": sampling}
            for role in ("generator", "verifier", "refiner")
        },
    }


def main() -> int:
    """Run the benchmark and write results.json."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=8, help="train questions expanded into trees")
    p.add_argument("--branching", type=int, default=2, help="n samples per role (n^3 leaves per question)")
    p.add_argument("--eval-questions", type=int, default=12, help="held-out test questions")
    p.add_argument("--eval-chains", type=int, default=3, help="chains per question, majority vote")
    p.add_argument("--subset", default="easy", help="arithmetic difficulty: easy, medium, hard")
    p.add_argument("--max-tokens", type=int, default=96, help="generation budget of every role")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of every role")
    p.add_argument("--epochs", type=float, default=2.0, help="SFT and DPO epochs")
    p.add_argument("--concurrency", type=int, default=8, help="episodes in flight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/malt_arithmetic")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    team_path = out / "team.yaml"
    team_path.write_text(yaml.safe_dump(team_yaml(args.max_tokens, args.temperature), sort_keys=False))
    command = " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1], *sys.argv])
    print(f"command: {command}", flush=True)
    config = MALTConfig(
        team=str(team_path),
        task="arithmetic",
        task_options={"subset": args.subset},
        questions=args.questions,
        branching=args.branching,
        eval_questions=args.eval_questions,
        eval_chains=args.eval_chains,
        sft_epochs=args.epochs,
        dpo_epochs=args.epochs,
        batch_size=4,
        concurrency=args.concurrency,
        out=str(out),
        seed=args.seed,
        resume=args.resume,
    )
    start = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - start
    before, after = result.evaluation.get("before", {}), result.evaluation.get("after", {})
    results = {
        "command": command,
        "seed": args.seed,
        "model": "local/smollm2-135m",
        "task": f"arithmetic:{args.subset} (train trees from the train split, evaluation on the test split)",
        "config": {k: v for k, v in vars(args).items()},
        "before": before,
        "after": after,
        "counts": result.counts,
        "adapters": {r: str(p) for r, p in result.adapters.items()},
        "wall_s": round(wall, 1),
        "wall_s_total_run": round(result.wall_s, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(
        f"accuracy before {before.get('accuracy', float('nan')):.3f}  after {after.get('accuracy', float('nan')):.3f}  "
        f"({args.eval_questions} test questions × {args.eval_chains} chains, seed {args.seed}, {wall / 60:.1f} min)"
    )
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
