"""Update throughput: trained tokens/s of our GRPO step (`trainers.update.policy_update`) vs TRL's GRPOTrainer.

Both sides train the same LoRA (same `LoraSettings`, same init seed, `attach_lora` on the same base) with
AdamW, gradient clipping at 1.0, no KL (beta = 0), token-level (DAPO) aggregation, fp32 (ours: see
`--train-dtype`), no gradient checkpointing, on the same batch: B sequences split into micro-batches of M,
one optimizer step per batch.

TRL side: `GRPOTrainer.train()` for warm-up + timed steps with a trivial reward function. A callback times
each optimizer step (`on_step_begin` → `on_step_end`) and a wrapper around `_generate_and_score_completions`
times the generation (and reward/advantage) phase inside it; the reported update time is step time minus
generation time, so generation is excluded. Generation is forced to exactly `--completion-tokens` tokens
(`min_new_tokens`), so every sequence trains the same number of tokens. Trained tokens = the completion
mask of the generated batch.

Our side: the first batch TRL generated (its exact prompt and completion token ids) is converted to a
`TrajectoryBatch` (old logprobs from one untimed no-grad forward, advantages from the rewards minus the
group mean) and `policy_update(loss="grpo", aggregation="token")` is timed for the same number of steps,
right after the TRL run in the same process (the machine may be shared: run it twice and compare).

    python benchmarks/bench_update.py                       # SmolLM2-135M, B=8 (G=4), 64 + 64 tokens
    python benchmarks/bench_update.py --model tiny-test     # seconds, for a smoke run
    python benchmarks/bench_update.py --prompt-tokens 512   # MLPO's shape: G samples share a long leader prompt
    python benchmarks/bench_update.py --train-dtype bfloat16  # ours on a bf16 base, LoRA in fp32 (TRL stays fp32)

A third row times `policy_update(share_prefix=False)` (each row's prompt forwarded on its own) on the
same batch, so the shared-prefix gain is measured side by side.

`--train-dtype bfloat16` loads our side's base in bfloat16 (the trainers' `train_dtype`: LoRA weights and
AdamW state stay fp32); the TRL side is unchanged (fp32), and the batch's old logprobs come from our model.
The dtype is printed and written to the JSON, so runs with either dtype can be compared.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mlpo_agents import zoo
from mlpo_agents.trainers.batch import BatchStats, TrajectoryBatch
from mlpo_agents.trainers.lora import LoraSettings, attach_lora
from mlpo_agents.trainers.losses import group_advantages, token_logprobs
from mlpo_agents.trainers.update import policy_update

LR = 1e-5


def lora_model(spec: str, settings: LoraSettings, seed: int, dtype: str = "float32") -> Any:
    """A fresh LoRA copy of the base (its weights in `dtype`, the LoRA in fp32) with a fixed init."""
    torch.manual_seed(seed)
    return attach_lora(spec, settings, dtype=dtype)


def prompts(count: int, tokens: int, tokenizer: Any) -> list[str]:
    """`count` distinct plain-text prompts of about `tokens` tokens."""
    words = "the team of agents solves each problem step by step and checks every answer twice".split()
    out = []
    for i in range(count):
        text = f"Question {i}:"
        while len(tokenizer(text)["input_ids"]) < tokens:
            text += " " + words[(len(text) + i) % len(words)]
        out.append(text)
    return out


# ------------------------------------------------------------------------------------------- TRL


def run_trl(args: argparse.Namespace, settings: LoraSettings) -> dict[str, Any]:
    """Train TRL's GRPOTrainer for warm-up + timed steps; returns per-step update times, tokens and the first batch."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    _, tokenizer = zoo.resolve(args.model)
    groups = args.sequences // args.group_size
    steps = args.warmup + args.steps
    dataset = Dataset.from_list(
        [{"prompt": p} for p in prompts(groups * steps, args.prompt_tokens, tokenizer)]
    )

    def reward(completions: list[str], **_: Any) -> list[float]:
        return [float(sum(c.encode()) % 5) for c in completions]

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_update_trl-"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.sequences // args.micro_batch,
        num_generations=args.group_size,
        max_completion_length=args.completion_tokens,
        generation_kwargs={"min_new_tokens": args.completion_tokens},
        temperature=1.0,
        max_steps=steps,
        learning_rate=LR,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="none",
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=args.seed,
        shuffle_dataset=False,
    )
    trainer = GRPOTrainer(
        model=lora_model(args.model, settings, args.seed),
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    record: dict[str, Any] = {"generate_s": [], "step_s": [], "tokens": [], "batches": []}
    generate = trainer._generate_and_score_completions

    def timed_generate(inputs: Any) -> Any:
        t0 = time.perf_counter()
        out = generate(inputs)
        record["generate_s"].append(time.perf_counter() - t0)
        record["tokens"].append(int(out["completion_mask"].sum().item()))
        record["batches"].append({k: v for k, v in out.items() if isinstance(v, torch.Tensor)})
        return out

    trainer._generate_and_score_completions = timed_generate

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            record["step_s"].append(time.perf_counter() - self.t0)

    trainer.add_callback(StepTimer())
    trainer.train()
    if len(record["step_s"]) != steps or len(record["generate_s"]) != steps:
        raise RuntimeError(
            f"expected {steps} optimizer steps with one generation each, saw {len(record['step_s'])} steps and "
            f"{len(record['generate_s'])} generations; check --sequences / --micro-batch"
        )
    record["update_s"] = [s - g for s, g in zip(record["step_s"], record["generate_s"], strict=True)]
    return record


# ------------------------------------------------------------------------------------------- ours


def to_trajectory_batch(
    trl_batch: dict[str, torch.Tensor], model: Any, group_size: int, pad: int
) -> TrajectoryBatch:
    """TRL's generated batch (left-padded prompts, right-padded completions) as our right-padded batch."""
    rows = []
    for p_ids, p_mask, c_ids, c_mask in zip(
        trl_batch["prompt_ids"],
        trl_batch["prompt_mask"],
        trl_batch["completion_ids"],
        trl_batch["completion_mask"],
        strict=True,
    ):
        rows.append((p_ids[p_mask.bool()].tolist(), c_ids[c_mask.bool()].tolist()))
    batch, width = len(rows), max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((batch, width), pad, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)  # (B, L)
    completion_mask = torch.zeros((batch, width))  # (B, L)
    for b, (p, c) in enumerate(rows):
        input_ids[b, : len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[b, : len(p) + len(c)] = 1
        completion_mask[b, len(p) : len(p) + len(c)] = 1.0
    with torch.no_grad():  # the sampling policy's logprobs, as the engine would have recorded them (untimed)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, L, V)
        old_logprobs = token_logprobs(logits, input_ids) * completion_mask  # (B, L)
    group_index = torch.arange(batch) // group_size  # (B,)
    rewards = torch.tensor([float(sum(c) % 5) for _, c in rows])  # (B,)
    return TrajectoryBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        old_logprobs=old_logprobs,
        rewards=rewards,
        advantages=group_advantages(rewards, group_index),
        group_index=group_index,
        prompt_lengths=torch.tensor([len(p) for p, _ in rows]),
        completion_lengths=torch.tensor([len(c) for _, c in rows]),
        call_ids=[str(b) for b in range(batch)],
        group_ids=[str(g) for g in range(batch // group_size)],
        stats=BatchStats(rows=batch),
    )


def run_ours(
    model: Any, optimizer: Any, batch: TrajectoryBatch, steps: int, micro_batch: int, share_prefix: bool = True
) -> dict[str, list]:
    """`steps` timed `policy_update` calls on one batch."""
    record: dict[str, list] = {"update_s": [], "tokens": []}
    for _ in range(steps):
        metrics = policy_update(
            model,
            optimizer,
            batch,
            loss="grpo",
            micro_batch_size=micro_batch,
            max_grad_norm=1.0,
            aggregation="token",
            clip_eps=0.2,
            share_prefix=share_prefix,
        )
        record["update_s"].append(metrics["update_s"])
        record["tokens"].append(int(metrics["trained_tokens"]))
    return record


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default="smollm2-135m", help="zoo spec (smollm2-135m, or tiny-test for a smoke run)"
    )
    parser.add_argument("--sequences", type=int, default=8, help="B: sequences per optimizer step")
    parser.add_argument("--group-size", type=int, default=4, help="G: completions per prompt")
    parser.add_argument("--micro-batch", type=int, default=4, help="M: rows per forward/backward")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="about this many prompt tokens")
    parser.add_argument(
        "--completion-tokens", type=int, default=64, help="exactly this many completion tokens"
    )
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps per side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="our side's base weights (LoRA and AdamW state stay float32); the TRL side is float32",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rates here")
    args = parser.parse_args()
    if args.sequences % args.group_size or args.sequences % args.micro_batch:
        parser.error("--sequences must be a multiple of --group-size and of --micro-batch")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    settings = LoraSettings()  # r=16, alpha=32, all-linear, no dropout: identical on both sides
    _, tokenizer = zoo.resolve(args.model)
    print(
        f"model={args.model} B={args.sequences} G={args.group_size} M={args.micro_batch} "
        f"prompt~{args.prompt_tokens} completion={args.completion_tokens} steps={args.steps} "
        f"warmup={args.warmup} threads={torch.get_num_threads()} train_dtype={args.train_dtype} (ours; TRL float32)"
    )

    trl = run_trl(args, settings)
    ours_model = lora_model(args.model, settings, args.seed, args.train_dtype)
    optimizer = torch.optim.AdamW([p for p in ours_model.parameters() if p.requires_grad], lr=LR)
    batch = to_trajectory_batch(
        trl["batches"][0], copy.deepcopy(ours_model).eval(), args.group_size, tokenizer.pad_token_id or 0
    )
    ours = run_ours(ours_model, optimizer, batch, args.warmup + args.steps, args.micro_batch)
    plain_model = lora_model(args.model, settings, args.seed, args.train_dtype)
    plain_optimizer = torch.optim.AdamW([p for p in plain_model.parameters() if p.requires_grad], lr=LR)
    plain = run_ours(plain_model, plain_optimizer, batch, args.warmup + args.steps, args.micro_batch, False)

    def rate(update_s: list[float], tokens: list[int]) -> float:
        return sum(tokens) / sum(update_s)

    trl_s, trl_tokens = trl["update_s"][args.warmup :], trl["tokens"][args.warmup :]
    ours_s, ours_tokens = ours["update_s"][args.warmup :], ours["tokens"][args.warmup :]
    trl_rate, ours_rate = rate(trl_s, trl_tokens), rate(ours_s, ours_tokens)
    gen_s = trl["generate_s"][args.warmup :]
    print(
        f"batch: {len(batch)} sequences, {batch.num_completion_tokens} trained tokens, "
        f"{int(batch.attention_mask.sum())} tokens in total (TRL step tokens: {sorted(set(trl_tokens))})"
    )
    print(
        f"TRL GRPOTrainer : {trl_rate:8.1f} trained tok/s  (update {sum(trl_s) / len(trl_s):.2f} s/step over "
        f"{len(trl_s)} steps; generation excluded, {sum(gen_s) / len(gen_s):.2f} s/step)"
    )
    print(
        f"policy_update   : {ours_rate:8.1f} trained tok/s  (update {sum(ours_s) / len(ours_s):.2f} s/step over "
        f"{len(ours_s)} steps; base {args.train_dtype})"
    )
    plain_rate = rate(plain["update_s"][args.warmup :], plain["tokens"][args.warmup :])
    print(f"  share_prefix=False: {plain_rate:8.1f} trained tok/s (each row's prompt forwarded on its own)")
    print(f"ratio ours / TRL: {ours_rate / trl_rate:.2f}x  (share_prefix=False: {plain_rate / trl_rate:.2f}x)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "trl_tok_s": trl_rate,
                    "ours_tok_s": ours_rate,
                    "ours_no_share_prefix_tok_s": plain_rate,
                    "train_dtype": args.train_dtype,
                    "trl_dtype": "float32",
                    "model": args.model,
                }
            )
        )


if __name__ == "__main__":
    main()
