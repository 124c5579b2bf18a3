"""TRL's SFT and DPO trainers on recorded token ids: MLPO's SFT warm-up and MALT's SFT / DPO phases.

Rows hold the prompt and completion token ids a trace recorded (never re-tokenized text): SFT rows put
the loss on completion tokens only; DPO rows go through `TokenDPOTrainer`, which skips TRL's
tokenization. `fit` runs either on a LoRA model in place, on CPU, without activation checkpointing, and
leaves the model in eval mode with only its own adapter (DPO's frozen reference copy removed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

Tokens = Sequence[int]


def sft_rows(examples: Iterable[tuple[Tokens, Tokens]], max_len: int | None = None) -> list[dict[str, Any]]:
    """SFT rows of (prompt ids, completion ids): loss on the completion only; longer than `max_len` left out."""
    return [
        {"input_ids": [*prompt, *completion], "labels": [-100] * len(prompt) + list(completion)}
        for prompt, completion in examples
        if max_len is None or len(prompt) + len(completion) <= max_len
    ]


def dpo_rows(pairs: Iterable[tuple[Tokens, Tokens, Tokens]], max_len: int | None = None) -> list[dict[str, Any]]:
    """DPO rows of (prompt, chosen, rejected) ids; a pair whose longer side exceeds `max_len` is left out."""
    return [
        {"prompt_ids": list(prompt), "chosen_ids": list(chosen), "rejected_ids": list(rejected)}
        for prompt, chosen, rejected in pairs
        if max_len is None or len(prompt) + max(len(chosen), len(rejected)) <= max_len
    ]


def fit(
    kind: str,
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    folder: Path,
    *,
    lr: float,
    seed: int,
    batch_size: int,
    micro_batch_size: int | None = None,
    epochs: float = 1.0,
    max_steps: int = -1,
    beta: float = 0.1,
    save_every: int = 0,
    resume: bool = False,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> Any:
    """Train `model` in place with TRL's `kind` ("sft" or "dpo") trainer on `rows`; returns TRL's TrainOutput.

    `batch_size` rows make an optimizer step, `micro_batch_size` of them per forward (gradient accumulation;
    None = all). `max_steps` > 0 overrides `epochs`; `save_every` > 0 writes TRL checkpoints to `folder` every N optimizer
    steps, and `resume` continues from the newest of them. `on_log` receives TRL's numeric log rows (with
    `optimizer_step`). DPO's reference policy is the adapter as it is before the call.
    """
    from datasets import Dataset
    from trl import DPOConfig, SFTConfig, SFTTrainer

    if kind not in ("sft", "dpo"):
        raise ValueError(f"kind={kind!r}: use sft or dpo")
    args: dict[str, Any] = dict(
        output_dir=str(folder),
        num_train_epochs=epochs,
        max_steps=max_steps,
        learning_rate=lr,
        seed=seed,
        per_device_train_batch_size=micro_batch_size or batch_size,
        gradient_accumulation_steps=batch_size // (micro_batch_size or batch_size),
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        max_length=None,
        gradient_checkpointing=False,  # TRL's default (True) recomputes activations: slower, and it stays on
        **({"save_strategy": "steps", "save_steps": save_every} if save_every else {"save_strategy": "no"}),
    )
    trainer = (SFTTrainer if kind == "sft" else _token_dpo_trainer())(
        model=model,
        args=SFTConfig(**args) if kind == "sft" else DPOConfig(**args, beta=beta),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[_forward_logs(on_log)] if on_log else None,
    )
    output = trainer.train(resume_from_checkpoint=_resume_point(folder) if resume else None)
    if kind == "dpo":
        if "ref" in model.peft_config:  # TRL's frozen reference copy; the served adapter is "default" alone
            model.delete_adapter("ref")
        model.set_adapter("default")
    model.eval()
    return output


def _token_dpo_trainer() -> type:
    from trl import DPOTrainer

    class TokenDPOTrainer(DPOTrainer):
        """DPOTrainer on rows that already hold `prompt_ids`, `chosen_ids`, `rejected_ids`: no re-tokenization."""

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset

    return TokenDPOTrainer


def _forward_logs(on_log: Callable[[dict[str, float]], None]) -> Any:
    from transformers import TrainerCallback

    class Forward(TrainerCallback):
        """Sends TRL's numeric log rows to `on_log`, with the optimizer step they were taken at."""

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
        ) -> None:
            numbers = {k: v for k, v in (logs or {}).items() if isinstance(v, int | float)}
            if numbers:
                on_log({**numbers, "optimizer_step": state.global_step})

    return Forward()


def _resume_point(folder: Path) -> str | None:
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return str(checkpoints[-1]) if checkpoints else None
