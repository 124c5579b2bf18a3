"""Learning benchmark: MALT trains a SmolLM2-135M generator, verifier and refiner on CPU, and measures the team.

    python examples/malt_learning.py --seed 0

MALT (`trainers/malt.py`, Motwani et al. 2024): each train question is expanded into the full search
tree (n answers, n critiques of each, n refinements of each critique), the leaves are graded by the
strict answer rule, values flow up by value iteration, and each role gets its own LoRA adapter: SFT on
its positives, then DPO on (positive, negative) siblings for the verifier and refiner (the generator is
trained with SFT only, as in the paper). The benchmark reports the held-out accuracy of the team's
majority vote over `--eval-chains` chains before and after training, on `--eval-questions` test
questions: strict answer rule (what trains), 95% Wilson intervals, McNemar's exact test on the
per-question outcomes (the same questions before and after), the lenient figure in its own column. It
also reports what the tree search found: positive and negative outputs per role and the SFT examples
and DPO pairs each role trained on. Writes `<out>/results.json`, `<out>/results.md` and the run's
metrics, traces and adapters; `--resume` continues an interrupted run.

Budget (defaults; each one a flag): the whole run, untrained evaluation + trees + SFT and DPO of three
adapters + trained evaluation, is meant to fit ~45 minutes on 2 quiet CPU cores. Measured in short runs
on a shared machine (SmolLM2-135M, `word_problems`, 96 new tokens, trees at T 0.3): the generator
writes ~60 completion tokens (prompt ~80), the verifier ~68 (prompt ~150, 35-50% cut at the cap), the
refiner ~85 (prompt ~230, 60-75% cut at the cap, and a cut reply has no strict answer: `--refiner-tokens`
gives it more), so one G -> V -> R chain costs ~200 generated tokens and a tree with n = 3
(3 + 9 + 27 outputs) ~3,200. At the engine's ~70 tok/s with 16 episodes in flight (README engine
benchmark ~120 tok/s quiet; the MLPO benchmark's shared-machine runs 50-80):
- evaluation, 200 questions x 1 chain: ~40k tokens, ~10 min each, ~20 min before + after. Three chains
  triple that (~60 min for the two evaluations alone), so the default is **one chain, greedy**
  (`--eval-temperature` 0 with one chain); the paper's majority vote over sampled chains is
  `--eval-chains 3` (at `--temperature`), for a longer run (measured: Qwen2.5-Coder-0.5B, arithmetic
  `medium`, 8 trees, 3 chains: 67 min in all on 2 quiet cores with an AMX CPU, 18.8 min per evaluation);
- trees, 16 questions x n = 3 (432 leaves): ~51k tokens, ~10-12 min (the paper's n = 3 kept: fewer full
  trees rather than more, smaller ones, so every sibling set has 3 members). In a 2-question smoke run
  6 of 54 leaves (11%) were right under the strict rule: 6 refiner and 1 verifier positives, no
  generator positive; 16 trees should give ~50 refiner, ~8 verifier and 0-3 generator positives;
- SFT + DPO on that data, 2 epochs, batches of 4: ~25 optimizer steps each for the refiner's SFT and
  DPO, fewer for the others, ~7-8 min (a LoRA step on 4 x 256 tokens is 3.6 s on a quiet CPU; in the
  shared smoke run a refiner SFT step of 4 rows took ~18 s, a DPO step of 2 pairs 28 s). With so few
  steps the learning rates sit at the top of the usual LoRA range (SFT 2e-4, DPO 1e-4; the MLPO
  benchmark's policy gradient uses 4e-4): a first choice, not tuned.
Total ~40 min quiet; a shared machine is 2-4x slower. MALTConfig has no time bound on the tree
expansion: lower `--questions` on a slower machine. Qwen2.5-Coder-0.5B (`--model qwen2.5-coder-0.5b`)
costs ~2.4x per generated token and ~4x per update step: halve `--questions` and expect ~1.5-2 hours.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import yaml

ROLES = ("generator", "verifier", "refiner")


def team_yaml(path: Path, args: argparse.Namespace) -> Path:
    """Write the benchmark team: generator, verifier and refiner on one model (in-process engine), all trainable."""
    budget = {"refiner": args.refiner_tokens or args.max_tokens}
    sampling = {role: {"temperature": args.temperature, "top_p": 0.95, "max_tokens": budget.get(role, args.max_tokens)}
                for role in ROLES}  # fmt: skip
    team = {
        "name": "malt-learning",
        "topology": "gvr",
        "params": {"chains": 1},
        "model_list": [{"model_name": "base", "litellm_params": {"model": f"local/{args.model}"}}],
        "router_settings": {"num_retries": 0, "timeout": 3600},
        "roles": {role: {"model": "base", "trainable": True, "sampling": sampling[role]} for role in ROLES},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(team, sort_keys=False))
    return path


def report(result: Any, args: argparse.Namespace, config: Any, wall_s: float) -> dict[str, Any]:
    """The before/after row (paired per question), the tree search's counts and the run's settings."""
    from mlpo_agents.report import command_line, paired_row

    before, after = result.evaluation["before"], result.evaluation["after"]
    row = paired_row(
        before["team_correct"],
        after["team_correct"],
        before_lenient=before["lenient_accuracy"],
        after_lenient=after["lenient_accuracy"],
    )
    tree: dict[str, Any] = next((r for r in result.history if "tree/leaves" in r), {})
    dpo_roles = set(config.dpo_roles)
    return {
        "command": command_line("examples/malt_learning.py", vars(args)),
        "seed": args.seed,
        "wall_minutes": round(wall_s / 60, 1),
        "rows": {"team": row},
        "roles": {"before": before.get("roles", {}), "after": after.get("roles", {})},
        "failed": {"before": before.get("failed", 0), "after": after.get("failed", 0)},
        "tree": {k.removeprefix("tree/"): v for k, v in tree.items() if k.startswith("tree/")},
        "search": {
            role: {**counts, "dpo_trained": counts["pairs"] if role in dpo_roles else 0}
            for role, counts in result.counts.items()
        },
        "config": {k: v for k, v in vars(config).items()},
        "adapters": {role: str(p) for role, p in result.adapters.items()},
    }


def markdown(results: dict[str, Any]) -> str:
    """The results table and the tree search's counts as Markdown."""
    from mlpo_agents.report import paired_markdown
    from mlpo_agents.trainers.malt_eval import roles_markdown

    cfg = results["config"]
    title = (
        f"MALT, {cfg['questions']} train trees (n = {cfg['branching']}), majority vote of {cfg['eval_chains']} "
        f"chain(s), {results['wall_minutes']} min in all, seed {results['seed']}"
    )
    lines = [paired_markdown(title, results["rows"], label="team"), ""]
    if results.get("roles", {}).get("before"):
        lines += [roles_markdown(results["roles"]["before"], results["roles"]["after"]), ""]
    tree = results["tree"]
    lines.append(
        f"Tree search: {tree.get('questions')} questions, {tree.get('leaves')} leaves, leaf accuracy "
        f"{tree.get('leaf_accuracy', float('nan')):.3f}, {tree.get('failed_episodes')} failed trees."
    )
    lines += ["", "| role | outputs | positive | negative | unvalued | SFT examples | DPO pairs (trained) |",
              "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for role, c in results["search"].items():
        lines.append(
            f"| {role} | {c['outputs']} | {c['positive']} | {c['negative']} | {c['unvalued']} | {c['sft']} | "
            f"{c['pairs']} ({c['dpo_trained']}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/malt_learning")
    parser.add_argument("--model", default="smollm2-135m", help="zoo spec of every role (e.g. qwen2.5-coder-0.5b)")
    parser.add_argument("--task", default="word_problems")
    parser.add_argument("--subset", default=None, help="the task's subset, e.g. easy for arithmetic")
    parser.add_argument("--questions", type=int, default=16, help="train questions expanded into trees")
    parser.add_argument("--branching", type=int, default=3, help="n samples per role (n^3 leaves per question)")
    parser.add_argument("--eval-questions", type=int, default=200, help="held-out test questions")
    parser.add_argument("--eval-chains", type=int, default=1, help="chains per question, majority vote")
    parser.add_argument(
        "--eval-temperature", type=float, default=None,
        help="sampling temperature at evaluation (default: greedy with one chain, --temperature with several)",
    )  # fmt: skip
    parser.add_argument("--temperature", type=float, default=0.7, help="the team's sampling temperature")
    parser.add_argument("--tree-temperature", type=float, default=0.3, help="sampling temperature of the trees")
    parser.add_argument("--max-tokens", type=int, default=96, help="generation budget of every role")
    parser.add_argument(
        "--refiner-tokens", type=int, default=None, help="the refiner's budget (default --max-tokens; its prompt is longest)"
    )
    parser.add_argument("--epochs", type=float, default=2.0, help="SFT and DPO epochs per role")
    parser.add_argument("--sft-lr", type=float, default=2e-4)
    parser.add_argument("--dpo-lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=4, help="rows (SFT) or pairs (DPO) per optimizer step")
    parser.add_argument(
        "--micro-batch", type=int, default=None,
        help="rows or pairs per forward (gradient accumulation up to --batch-size): less memory, same updates",
    )  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=16, help="episodes in flight")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
        help="the in-process engine's dtype for trees and evaluations (training stays fp32). auto: bfloat16 where "
        "the CPU has native bf16 kernels (AMX / AVX-512 BF16), else float32; a resumed run keeps its first stage's",
    )  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    args = parser.parse_args()
    from mlpo_agents.engines import run_dtype

    args.dtype = run_dtype(args.dtype, Path(args.out), args.resume)
    os.environ["MLPO_ENGINE_DTYPE"] = args.dtype
    if args.eval_temperature is None:
        args.eval_temperature = 0.0 if args.eval_chains == 1 else args.temperature

    from mlpo_agents.trainers.malt import MALTConfig, train

    out = Path(args.out)
    config = MALTConfig(
        team=str(team_yaml(out / "team.yaml", args)),
        task=args.task,
        task_options={} if args.subset is None else {"subset": args.subset},
        questions=args.questions,
        branching=args.branching,
        tree_temperature=args.tree_temperature,
        eval_questions=args.eval_questions,
        eval_chains=args.eval_chains,
        eval_temperature=args.eval_temperature,
        sft_epochs=args.epochs,
        dpo_epochs=args.epochs,
        sft_lr=args.sft_lr,
        dpo_lr=args.dpo_lr,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch,
        concurrency=args.concurrency,
        out=str(out),
        seed=args.seed,
        resume=args.resume,
    )
    from mlpo_agents.report import write_learning_results

    start = time.perf_counter()
    result = train(config)
    results = report(result, args, config, time.perf_counter() - start)
    write_learning_results(out, results, markdown(results))


if __name__ == "__main__":
    main()
