"""Learning benchmark: MAGRPO trains a two-agent SmolLM2-135M team (drafter + solver) on CPU, and measures it.

    python examples/magrpo_learning.py --minutes 30 --seed 0

The built-in `cooperate` team (graphs/cooperate.py): a drafter writes a plan, a solver answers from it;
both are SmolLM2-135M, each with its own LoRA adapter, trained with MAGRPO (trainers/magrpo.py) from one
joint reward per joint action. Held-out accuracy on `--eval-questions` test questions, greedy, strict
answer rule (the reward that trains is the number reported), before and after training, paired per
question: 95% Wilson intervals, questions gained / lost and McNemar's exact p. Rows:
- `team`: the joint two-agent pass rate; before training it is the prompted two-agent baseline.
- `solver alone`: the solver's model answering by itself (as the `solo` team's leader); before training
  it is the single-agent baseline (SmolLM2 alone), after it the trained solver alone.
- `trained team vs untrained solver alone`: the trained team against the single-agent baseline.
Writes `<out>/results.json`, `<out>/results.md` and `<out>/curves.png` (train reward per step).

Defaults (each one a flag): task `word_problems`, G = 8 joint actions x 4 questions per step, LoRA r 16,
lr 4e-4, both agents sampled at T 0.7 / top-p 0.95 (CoMLRL samples at 0.6 / 0.6), 96 new tokens each,
shaping reward `answered` 0.3 beside strict correctness, rollouts and evaluations on a bf16 engine where the CPU
has native bf16 kernels (`--dtype auto`; the updates stay fp32). Why, from short runs on a 2-core CPU (seed 0):
the untrained team answers under the strict rule in few samples (4 questions x G 4 at T 0.7: no strict
correct answer in 16, 2 strict answers, 1 right number under the lenient rule; 14 of 16 drafts and 4 of
16 answers cut at 96 tokens), so strict correctness alone gives groups with equal rewards; a shaping
entry and G = 8 make groups whose rewards differ more likely. `answered` rather than `lenient`: in the
MLPO benchmark (README) `answered` lifted the team's strict accuracy within one 30-minute stage, while
`lenient` mostly lifted the leader alone (`--format-reward lenient --format-weight 0.5` to compare).
`--solo-fraction` (0, the paper) trains the solver on some questions alone too: with joint actions only, a run
raised the team 0.025 -> 0.155 while the solver alone fell 0.175 -> 0.020. README recipe B as one command
(`--format-reward lenient --format-weight 0.5 --solo-fraction 0.25 --solo-from-step 25 --max-steps 49`, bf16
engine): team 0.030 -> 0.930, solver alone 0.140 -> 0.915, in 38.6 minutes; with --seed 1, 0.025 -> 0.740 and
0.200 -> 0.710.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

ROWS = {
    # row name -> (before: evaluation "before"'s outcomes, after: evaluation "after"'s outcomes)
    "team": ("team", "team"),
    "solver alone": ("solo", "solo"),
    "trained team vs untrained solver alone": ("solo", "team"),
}


def paired_rows(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The before/after rows (`ROWS`) from two evaluations' per-question strict outcomes (`*_correct`), with
    the lenient figures beside them where both evaluations have one."""
    from mlpo_agents.report import paired_row

    rows = {}
    for name, (was, now) in ROWS.items():
        if f"{was}_correct" not in before or f"{now}_correct" not in after:
            continue
        lenient = (before.get(f"{was}_lenient_accuracy"), after.get(f"{now}_lenient_accuracy"))
        extra = {"before_lenient": lenient[0], "after_lenient": lenient[1]} if None not in lenient else {}
        rows[name] = paired_row(before[f"{was}_correct"], after[f"{now}_correct"], **extra)
    return rows


TEAM_FILE_SETS = ("model", "max_tokens", "temperature", "top_p")
"""Flags of the built-in cooperate team that a `--team` file's own settings replace."""


def reproducing_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that made the run: with `--team`, the ones its team file overrides are left out."""
    return {k: v for k, v in vars(args).items() if not (args.team and k in TEAM_FILE_SETS)}


def recorded_config(config: Any, team: Any = None) -> dict[str, Any]:
    """The run's settings as `results.json` records them: with a `--team` file, its agents' own model and
    sampling replace the built-in team's `TEAM_FILE_SETS`, which did not apply."""
    record = dict(vars(config))
    if team is None:
        return record
    for key in TEAM_FILE_SETS:
        record.pop(key, None)
    record["team_agents"] = {
        role: {"model": team.deployment(rc.model)["litellm_params"]["model"], **rc.sampling.as_kwargs()}
        for role, rc in team.roles.items()
    }
    return record


def report(result: Any, args: argparse.Namespace, config: Any, wall_s: float, team: Any = None) -> dict[str, Any]:
    """The before/after table with intervals and paired tests, as a JSON-able dict."""
    from mlpo_agents.report import command_line

    history = [row for row in result.history if "reward/mean" in row]
    return {
        "command": command_line("examples/magrpo_learning.py", reproducing_flags(args)),
        "seed": args.seed,
        "team": args.team or "cooperate",
        "steps": result.steps,
        "wall_minutes": round(wall_s / 60, 1),
        "train_minutes_budget": args.minutes,
        "rows": {  # "solver" is the answering agent: `main` in a code_pair team
            name.replace("solver", config.answer_role): row
            for name, row in paired_rows(result.evaluation["before"], result.evaluation["after"]).items()
        },
        "train_reward_per_step": [round(row["reward/mean"], 4) for row in history],
        "config": recorded_config(config, team),
        "adapters": {role: str(path) for role, path in result.adapters.items()},
    }


def markdown(results: dict[str, Any]) -> str:
    """The results table as Markdown."""
    from mlpo_agents.report import paired_markdown

    title = (
        f"MAGRPO, {results['team']} team ({' + '.join(results['config']['agents'])}) on {results['config']['task']}, "
        f"{results['steps']} steps, {results['wall_minutes']} min in all, "
        f"seed {results['seed']}"
    )
    return paired_markdown(title, results["rows"], label="who")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="training wall-time budget (evaluation excluded)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/magrpo_learning")
    parser.add_argument("--model", default="smollm2-135m", help="zoo spec of both agents of the built-in team")
    parser.add_argument(
        "--team", default=None,
        help="team YAML or built-in name instead of the built-in cooperate team (e.g. qwen_code_pair with --task code: "
        "the paper's code setting); its own sampling settings apply, --model/--temperature/--top-p/--max-tokens do not",
    )
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
        help="the in-process engine's dtype for rollouts and evaluations (training stays fp32; MAGRPO is on-policy "
        "and reads no rollout logprobs). auto: bfloat16 where the CPU has native bf16 kernels (AMX / AVX-512 BF16), "
        "else float32; a resumed run keeps its first stage's",
    )
    parser.add_argument(
        "--train-dtype", default="float32", choices=("float32", "bfloat16"),
        help="the trained copy's base weights in updates (LoRA weights, gradients and AdamW state stay fp32)",
    )
    parser.add_argument("--task", default="word_problems")
    parser.add_argument("--eval-questions", type=int, default=200)
    parser.add_argument("--group-size", type=int, default=8, help="G: joint actions per question")
    parser.add_argument("--questions-per-step", type=int, default=4)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--format-weight", type=float, default=0.3)
    parser.add_argument(
        "--format-reward", default="answered", choices=("format", "answered", "lenient"), help="what --format-weight rewards"
    )
    parser.add_argument("--max-tokens", type=int, default=96, help="completion budget of each agent")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of both agents in training")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument(
        "--solo-fraction", type=float, default=0.0,
        help="share of each step's questions the solver answers alone (G samples each), trained in the same "
        "update to keep its solo skill; 0 = the paper",
    )
    parser.add_argument(
        "--solo-from-step", type=int, default=0,
        help="steps of joint actions only before the solo groups begin (README recipe B: 25)",
    )  # fmt: skip
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per forward/backward")
    parser.add_argument("--max-steps", type=int, default=500, help="upper bound; --minutes usually stops first")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    args = parser.parse_args()
    from mlpo_agents.engines import run_dtype

    args.dtype = run_dtype(args.dtype, Path(args.out), args.resume)
    os.environ["MLPO_ENGINE_DTYPE"] = args.dtype
    from mlpo_agents.trainers.magrpo import MAGRPOConfig, train

    out = Path(args.out)
    config = MAGRPOConfig(
        team=args.team,
        model=args.model,
        task=args.task,
        out=str(out),
        steps=args.max_steps,
        group_size=args.group_size,
        questions_per_step=args.questions_per_step,
        train_questions=2000,
        lr=args.lr,
        format_weight=args.format_weight,
        format_reward=args.format_reward,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        solo_fraction=args.solo_fraction,
        solo_from_step=args.solo_from_step,
        micro_batch_size=args.micro_batch,
        eval_questions=args.eval_questions,
        eval_temperature=0.0,
        save_every=5,
        seed=args.seed,
        resume=args.resume,
        max_minutes=args.minutes,
        concurrency=16,
        train_dtype=args.train_dtype,
    )
    team = None
    if args.team:  # the team's own agents (helper + main for code_pair), as training applies them
        from mlpo_agents.config import load_team
        from mlpo_agents.trainers.magrpo import for_team

        team = load_team(args.team)
        config = for_team(config, team)
    from mlpo_agents.report import write_learning_results

    start = time.perf_counter()
    result = train(config)
    results = report(result, args, config, time.perf_counter() - start, team)
    write_learning_results(out, results, markdown(results))


if __name__ == "__main__":
    main()
