"""Learning benchmark: MLPO trains a SmolLM2-135M leader of 3 SmolLM2 peers, on CPU, and measures it.

    python examples/mlpo_learning.py --max-steps 32 --seed 0

Held-out accuracy (strict answer rule: the reward that trains is the number reported) of the leader
with its team and alone, before and after training, on `--eval-questions` test questions, with 95%
Wilson intervals and McNemar's exact paired test. The team's peers answer each held-out question once
(an evaluation pool), so before and after show the leader the same proposals and differ only by the
leader. Writes `<out>/results.json`, `<out>/results.md`, `<out>/curves.png` (train reward per step).

The recipe (defaults; each one a flag; README "Results", recipe 7: over five runs of 32 steps the team went
from 0.055-0.095 to 0.065-0.425 and the leader alone from 0.175-0.195 to 0.255-0.790; seeds decide much of a
32-step CPU run):
- Task `word_problems` (one-step stories, numbers 1..9, + and -): the untrained SmolLM2 leader alone
  answers 17.5% of 200 held-out questions under the strict rule, with its team 9.5% — shown three noisy
  proposals, it rambles to the token cap. That is the gap MLPO exists to close.
- MLPO as in the paper: frozen peers whose round-0 proposals are pooled per question, G = 8 leader
  samples per question, Dr. GRPO advantages (reward minus group mean), tempered policy gradient at the
  leader's sampling temperature (0.7), easy-question filter from the pooled peer answers.
- Beside strict correctness, a `lenient` shaping reward at 0.5 (the right number under the last-number
  rule; unlike `answered` it never pays for a wrong answer), and a quarter of each step's questions
  sampled with the leader alone (`--solo-fraction 0.25`, not in the paper: it keeps the leader's own
  skill growing while it learns to use its team).
- 4 questions per step, LoRA r 16, lr 4e-4, 96 new tokens, 55 minutes of training at most.
- Rollouts and evaluations on a bf16 engine where the CPU has native bf16 kernels (`--dtype auto`; the update
  stays fp32): over three seeds the team gained 10-13 points and the leader alone 15-47 in 15.1-17.9 minutes in
  all, where two fp32 runs of the same commit line gained 12.5-13.5 / 12-13 in 25.5-26.0 minutes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml


def team_yaml(path: Path, args: argparse.Namespace) -> Path:
    """Write the benchmark team: SmolLM2 leader (trainable) + 3 SmolLM2 peers on the in-process engine."""
    team = {
        "name": "mlpo-learning",
        "topology": "leader_peers",
        "params": {"peers": args.peers, "rounds": 1},
        "model_list": [
            {"model_name": "leader", "litellm_params": {"model": f"local/{args.model}", "dtype": args.dtype}}
        ],
        "router_settings": {"num_retries": 0, "timeout": 3600},
        "roles": {
            "leader": {
                "model": "leader",
                "trainable": True,
                "sampling": {"temperature": 0.0, "max_tokens": args.leader_tokens},  # greedy when it serves
            },
            "peer": {
                "model": "leader",
                "sampling": {"temperature": args.peer_temperature, "top_p": 0.95, "max_tokens": args.peer_tokens},
            },
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(team, sort_keys=False))
    return path


def report(result: object, args: argparse.Namespace, config: object, wall_s: float) -> dict[str, object]:
    """The before/after table with intervals and paired tests, as a JSON-able dict."""
    from mlpo_agents.report import command_line, paired_row

    before, after = result.evaluation["before"], result.evaluation["after"]  # type: ignore[attr-defined]
    rows = {
        who: paired_row(
            before[f"{who}_correct"],
            after[f"{who}_correct"],
            before_lenient=before[f"{who}_lenient_accuracy"],
            after_lenient=after[f"{who}_lenient_accuracy"],
        )
        for who in ("team", "solo")
    }
    return {
        "command": command_line("examples/mlpo_learning.py", vars(args)),
        "seed": args.seed,
        "steps": result.steps,  # type: ignore[attr-defined]
        "wall_minutes": round(wall_s / 60, 1),
        "train_minutes_budget": args.minutes,
        "rows": rows,
        "config": {k: v for k, v in vars(config).items()},
        "adapter": str(result.adapter),  # type: ignore[attr-defined]
    }


def markdown(results: dict[str, object]) -> str:
    """The results table as Markdown."""
    from mlpo_agents.report import paired_markdown

    title = f"MLPO, {results['steps']} steps, {results['wall_minutes']} min in all, seed {results['seed']}"
    return paired_markdown(title, results["rows"], label="leader")  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=55.0, help="training wall-time budget (evaluation excluded)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/mlpo_learning")
    parser.add_argument("--model", default="smollm2-135m", help="zoo spec of the leader and the peers")
    parser.add_argument(
        "--dtype", "--engine-dtype", dest="dtype", default="auto", choices=("auto", "float32", "bfloat16"),
        help="the in-process engine's dtype for rollouts and evaluations (training stays fp32). auto: bfloat16 where "
        "the CPU has native bf16 kernels (AMX / AVX-512 BF16), else float32; a resumed run keeps its first stage's",
    )  # fmt: skip
    parser.add_argument(
        "--train-dtype", default="float32", choices=("float32", "bfloat16"),
        help="the trained copy's base weights in updates (LoRA weights, gradients and AdamW state stay fp32)",
    )
    parser.add_argument("--task", default="word_problems")
    parser.add_argument("--eval-questions", type=int, default=200)
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--questions-per-step", type=int, default=4)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--format-weight", type=float, default=0.5)
    parser.add_argument(
        "--format-reward", default="lenient", choices=("format", "answered", "lenient"), help="what --format-weight rewards"
    )
    parser.add_argument("--leader-temperature", type=float, default=0.7)
    parser.add_argument("--peer-temperature", type=float, default=0.7)
    parser.add_argument("--leader-tokens", type=int, default=96)
    parser.add_argument("--peer-tokens", type=int, default=96)
    parser.add_argument("--sft-steps", type=int, default=0, help="SFT warm-up steps on correct leader samples")
    parser.add_argument(
        "--solo-fraction", type=float, default=0.25, help="share of each step's questions sampled without peers"
    )
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per forward/backward (G: one prompt pass)")
    parser.add_argument(
        "--baseline-from", default=None, help="reuse the untrained evaluation of an earlier run with the same settings"
    )
    parser.add_argument("--max-steps", type=int, default=500, help="upper bound; --minutes usually stops first")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint (a second stage: "
        "flags may change, e.g. --solo-fraction; the untrained evaluation is the first stage's)"
    )
    args = parser.parse_args()

    from mlpo_agents.engines import run_dtype
    from mlpo_agents.trainers.mlpo import MLPOConfig, train

    out = Path(args.out)
    args.dtype = run_dtype(args.dtype, out, args.resume)
    config = MLPOConfig(
        team=str(team_yaml(out / "team.yaml", args)),
        task=args.task,
        out=str(out),
        steps=args.max_steps,
        group_size=args.group_size,
        questions_per_step=args.questions_per_step,
        train_questions=2000,
        pool_samples=1,  # the paper pools 4 samples per peer; 1 keeps peer sampling at a quarter on a CPU
        lr=args.lr,
        format_weight=args.format_weight,
        format_reward=args.format_reward,
        sft_steps=args.sft_steps,
        solo_fraction=args.solo_fraction,
        micro_batch_size=args.micro_batch,
        leader_temperature=args.leader_temperature,
        baseline_from=args.baseline_from,
        eval_questions=args.eval_questions,
        eval_temperature=0.0,
        save_every=5,
        seed=args.seed,
        resume=args.resume,
        max_minutes=args.minutes,
        concurrency=16,
        train_dtype=args.train_dtype,
    )
    from mlpo_agents.report import write_learning_results

    start = time.perf_counter()
    result = train(config)
    results = report(result, args, config, time.perf_counter() - start)
    write_learning_results(out, results, markdown(results))


if __name__ == "__main__":
    main()
