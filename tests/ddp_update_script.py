"""Run by tests/test_mlpo.py under `accelerate launch --num_processes 2 --cpu`: two policy_update steps
on the tiny model with DDP; each rank writes its LoRA weights to <out>/rank<r>.pt."""

import os
import sys
from pathlib import Path

import torch

from mlpo_agents.trainers.batch import BatchStats, TrajectoryBatch
from mlpo_agents.trainers.lora import LoraSettings, attach_lora
from mlpo_agents.trainers.update import policy_update


def synthetic_batch(rows: int = 6, prompt: int = 5, completion: int = 7) -> TrajectoryBatch:
    """A fixed batch: random tokens, old logprobs a bit off the model, advantages of two groups."""
    g = torch.Generator().manual_seed(0)
    width = prompt + completion
    input_ids = torch.randint(3, 200, (rows, width), generator=g)
    mask = torch.zeros(rows, width)
    mask[:, prompt:] = 1.0
    old = torch.where(mask.bool(), -torch.rand(rows, width, generator=g) * 5, 0.0)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0][:rows])
    group_index = torch.tensor([0, 0, 0, 1, 1, 1][:rows])
    return TrajectoryBatch(
        input_ids=input_ids,
        attention_mask=torch.ones(rows, width, dtype=torch.long),
        completion_mask=mask,
        old_logprobs=old,
        rewards=rewards,
        advantages=rewards - 0.5,
        group_index=group_index,
        prompt_lengths=torch.full((rows,), prompt),
        completion_lengths=torch.full((rows,), completion),
        call_ids=[str(i) for i in range(rows)],
        group_ids=["a", "b"],
        stats=BatchStats(),
    )


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def main(out: Path, distributed: bool) -> None:
    torch.manual_seed(0)
    model = attach_lora("tiny-test", LoraSettings(r=4, alpha=8))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    accelerator = None
    if distributed:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(model, optimizer)
    batch = synthetic_batch()
    for _ in range(2):
        policy_update(
            model,
            optimizer,
            batch,
            loss="grpo",
            micro_batch_size=2,
            max_grad_norm=1.0,
            accelerator=accelerator,
            aggregation="dr_grpo",
            max_tokens=8,
        )
    rank = accelerator.process_index if accelerator else "single"
    unwrapped = accelerator.unwrap_model(model) if accelerator else model
    torch.save(lora_weights(unwrapped), out / f"rank{rank}.pt")
    if accelerator:
        # Both ranks' weights on disk, then leave without tearing gloo down: left to the interpreter's exit its
        # threads have aborted the process, and destroy_process_group (accelerator.end_training) has hung in one
        # rank after both had written their files (seen once in a CI run: a futex wait, no timeout).
        accelerator.wait_for_everyone()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), distributed=sys.argv[2] == "ddp")
