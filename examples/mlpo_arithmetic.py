"""Learning benchmark: MLPO on a SmolLM2-135M leader with 3 SmolLM2 peers, synthetic arithmetic, CPU.

Measures held-out accuracy of the leader with its team and solo (peers=0), before and after
`--minutes` of training, prints a table and writes `runs/mlpo_arithmetic/results.json`.

    python examples/mlpo_arithmetic.py --minutes 30 --seed 0

Choices made so a 135M model can move at all (the shipped SmolLM2 is the Q4_1 GGUF, dequantized; a
greedy baseline run here got 0/12 easy sums right and wrote the answer block 1 time in 12):
- Task: 2-operand addition/subtraction with operands 0..20 (`subset=easy, max_value=20`).
- A system prompt for every role asking for a one-line answer ending in `<answer>N</answer>`: the
  base model otherwise never writes the answer block the reward reads.
- Reward = correctness + `format_weight` x format (one well-formed `<answer>` block), weight 1.0 by
  default. With correctness at zero at the start, the format term is the only early learning signal.
- Leader samples at temperature 0.7 (at 1.0 it wrote no answer block in 16 samples); evaluation is greedy.
- Short completions (leader 40, peers 32 tokens) to fit many rollouts into the CPU budget.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

SYSTEM = (
    "You solve arithmetic. Reply in one short line: the calculation, then the result inside answer tags.\n"
    "Example: Compute 4 + 3. -> 4 + 3 = 7 <answer>7</answer>"
)


def team_yaml(path: Path, leader_tokens: int, peer_tokens: int, leader_temperature: float) -> Path:
    """Write the benchmark team: SmolLM2 leader (trainable) + 3 SmolLM2 peers on the local engine."""
    team = {
        "name": "mlpo-arithmetic",
        "topology": "leader_peers",
        "params": {"peers": 3, "rounds": 1},
        "model_list": [{"model_name": "smollm2", "litellm_params": {"model": "local/smollm2-135m"}}],
        "router_settings": {"num_retries": 0, "timeout": 3600},
        "roles": {
            "leader": {
                "model": "smollm2",
                "trainable": True,
                "system_prompt": SYSTEM,
                "sampling": {"temperature": 1.0, "max_tokens": leader_tokens},
            },
            "peer": {
                "model": "smollm2",
                "system_prompt": SYSTEM,
                "sampling": {"temperature": 0.7, "max_tokens": peer_tokens},
            },
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(team, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="training wall-time budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/mlpo_arithmetic")
    parser.add_argument("--eval-questions", type=int, default=24)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--questions-per-step", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--format-weight", type=float, default=1.0)
    parser.add_argument("--leader-temperature", type=float, default=0.7, help="leader sampling temperature")
    parser.add_argument(
        "--max-steps", type=int, default=500, help="upper bound; --minutes usually stops first"
    )
    args = parser.parse_args()

    os.environ.setdefault("MLPO_DATA_DIR", "/work/shared/data")
    from mlpo_agents.trainers.mlpo import MLPOConfig, train

    out = Path(args.out)
    config = MLPOConfig(
        team=str(team_yaml(out / "team.yaml", 40, 32, args.leader_temperature)),
        task="arithmetic",
        task_options={"subset": "easy", "max_value": 20},
        out=str(out),
        steps=args.max_steps,
        group_size=args.group_size,
        questions_per_step=args.questions_per_step,
        lr=args.lr,
        format_weight=args.format_weight,
        eval_questions=args.eval_questions,
        eval_temperature=0.0,
        save_every=10,
        seed=args.seed,
        max_minutes=args.minutes,
        concurrency=8,
    )
    start = time.perf_counter()
    result = train(config)
    before, after = result.evaluation["before"], result.evaluation["after"]
    rows = [(name, before[f"{name}_accuracy"], after[f"{name}_accuracy"]) for name in ("team", "solo")]
    print(
        f"\nMLPO arithmetic (seed {args.seed}, {result.steps} steps, {args.minutes} min budget, "
        f"{args.eval_questions} held-out questions)"
    )
    print(f"{'leader':<8}{'before':>10}{'after':>10}{'delta':>10}")
    for name, b, a in rows:
        print(f"{name:<8}{b:>10.3f}{a:>10.3f}{a - b:>+10.3f}")
    results = {
        "seed": args.seed,
        "steps": result.steps,
        "minutes_budget": args.minutes,
        "wall_s": round(time.perf_counter() - start, 1),
        "train_wall_s": round(result.wall_s, 1),
        "eval_questions": args.eval_questions,
        "before": before,
        "after": after,
        "config": {k: v for k, v in vars(config).items()},
        "adapter": str(result.adapter),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
