"""What the MLPO, MAGRPO and MALT trainers share: config fields, data loading, rollouts, served LoRA adapters.

- `RunConfig`: the fields every trainer config has; `PolicyGradientConfig` adds those of the two
  group-baseline policy-gradient trainers (MLPO, MAGRPO). Each trainer's config subclasses one of them
  and adds its own fields and validation; `mlpo train` maps flags onto the fields by name.
- `load_split`, `run_episodes`: a task split as the config describes it; the team run on tasks through
  a view of the model client (`ModelClient.with_team`) that keeps its adapter routing.
- `load_adapter_weights`, `TrainableLora`: the trainable LoRA copy (model, optimizer, served version), its
  adapters saved and hot-loaded into the engine serving its role with `mlpo_agents.adapters`.

The run itself (seeding, typed state, resume, the step loop, the result) is `trainers.run`; TRL's SFT and
DPO on recorded tokens are `trainers.trl_glue`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlpo_agents.adapters import hot_load, role_engine
from mlpo_agents.adapters import save as save_adapter

if TYPE_CHECKING:
    from mlpo_agents.config import TeamConfig
    from mlpo_agents.models import ModelClient
    from mlpo_agents.tasks.base import Task
    from mlpo_agents.trace import TraceStore


# ------------------------------------------------------------------------------------------- config


@dataclass
class RunConfig:
    """Fields every trainer config has (task data, LoRA shape, evaluation size, seeding, progress)."""

    task: str = "arithmetic"
    """Task name for `load_task` (train split for training, test split for evaluation)."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """Extra `load_task` options (e.g. {"subset": "easy", "max_value": 20}), same for train and test."""
    data_dir: str | None = None
    """Local benchmark folder (default: $MLPO_DATA_DIR)."""
    traces: str | None = None
    """Trace store the rollouts are written to and offline training reads (default `<out>/traces.sqlite`)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha (update scaled by alpha / r)."""
    eval_questions: int = 0
    """Held-out test questions for the before/after evaluation; 0 = no evaluation."""
    seed: int = 0
    """Seed of the question order, sampling seeds, LoRA initialisation and data shuffles."""
    progress: bool = True
    """Show progress output (bars, phase lines)."""


@dataclass
class PolicyGradientConfig(RunConfig):
    """Fields of the group-baseline policy-gradient trainers (MLPO, MAGRPO): steps, groups, optimizer, budget."""

    steps: int = 20
    """Optimizer steps (online: one rollout + update each; offline: total over all epochs)."""
    group_size: int = 4
    """G: samples sharing one context and baseline (MLPO: leader samples per question; MAGRPO: joint actions per node)."""
    questions_per_step: int = 4
    """Questions (groups, or root nodes) per step."""
    train_questions: int = 200
    """Size of the train-split question list the steps cycle through."""
    lr: float = 1e-4
    """AdamW learning rate of the LoRA parameters (of every trained adapter)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    std_scale: bool = False
    """Divide advantages by (group std + `losses.STD_EPS`, TRL's 1e-4) (original GRPO); False = Dr. GRPO / MAGRPO."""
    tempered_policy: bool = True
    """Optimise the policy that was sampled, softmax(logits / T) at each call's recorded temperature (TRL
    GRPOTrainer); the ratio's old logprobs are then tempered ones of the sampling weights (see
    `trainers.update`). False: differentiate the raw T = 1 policy against the engine's recorded raw logprobs
    (the gradient of another distribution than the sampled one whenever T != 1)."""
    format_weight: float = 0.0
    """Weight of the format reward added to correctness (0 by default, as in the papers)."""
    format_reward: str = "format"
    """Which recorded reward `format_weight` weighs: `format` (exactly one well-formed `<answer>` block),
    `answered` (the output gives an answer under the strict rule — a block, `\\boxed{}` or a final-answer
    phrase ending an uncut reply — right or wrong) or `lenient` (the call's answer is right under the lenient
    rule, last number as a fallback; the rollouts then score with `shaping_rubric`)."""
    micro_batch_size: int = 4
    """Rows per forward/backward (gradient accumulation over the batch)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (per trained adapter)."""
    max_len: int | None = 1024
    """Rows longer than this (prompt + completion) are skipped."""
    eval_temperature: float = 0.0
    """Temperature at evaluation (0 = greedy)."""
    concurrency: int = 8
    """Episodes in flight during rollouts. Tokens do not depend on it (per-request seeds), but the engine's
    logprobs vary in the last float bits with batch composition: use 1 for bit-identical reruns."""
    save_every: int = 0
    """Checkpoint every N steps (0: only adapters, no resumable checkpoint)."""
    max_minutes: float | None = None
    """Stop training after this much time in steps, in minutes (checked after each step; evaluation and the SFT
    warm-up are left out of it)."""
    train_dtype: str = "float32"
    """The dtype of the trained copy's base weights in updates: float32 or bfloat16 (opt-in). With bfloat16 the
    LoRA weights, their gradients and the AdamW state stay float32 (peft upcasts the adapter and casts its
    input to float32), the base weights take half the memory, and log-probs are computed from bf16 logits cast
    to float32 one row at a time (`trainers.losses.token_logprobs`); gradients match float32's within the
    tolerance tests/test_update_bf16.py pins."""


FORMAT_REWARDS = ("format", "answered", "lenient")
"""The values `PolicyGradientConfig.format_reward` may take."""
TRAIN_DTYPES = ("float32", "bfloat16")
"""The values `PolicyGradientConfig.train_dtype` may take."""


def train_dtype_problems(config: PolicyGradientConfig) -> list[str]:
    """The config's validation message for a `train_dtype` it does not take (empty when it is fine)."""
    if config.train_dtype in TRAIN_DTYPES:
        return []
    return [f"train_dtype={config.train_dtype!r}: use one of {', '.join(TRAIN_DTYPES)}"]


# ------------------------------------------------------------------------------------------- data and rollouts


def load_split(config: RunConfig, split: str, limit: int, seed: int | None = None) -> list[Any]:
    """`limit` questions of `split` of the configured task (seed: the run seed unless given)."""
    from mlpo_agents.tasks import load_task

    return load_task(
        config.task,
        split=split,
        limit=limit,
        seed=config.seed if seed is None else seed,
        data_dir=config.data_dir,
        **config.task_options,
    )


def shaping_rubric(config: PolicyGradientConfig) -> contextlib.AbstractContextManager[Any]:
    """Score the rollouts run inside it so that the reward `format_reward` names is recorded per call: the
    rubric in use (`use_rubric`, else the task's) plus a call-level `lenient` entry when it is asked for."""
    from mlpo_agents.rubric import rubric_for, use_rubric, with_call_lenient

    if config.format_reward != "lenient" or not config.format_weight:
        return contextlib.nullcontext()
    return use_rubric(with_call_lenient(rubric_for(load_split(config, "test", 1)[0])))


def run_episodes(
    client: ModelClient, team: TeamConfig, tasks: list[Task], store: TraceStore, *, task_name: str, concurrency: int, **options: Any
) -> Any:
    """Run `team` on `tasks` through `client` (its adapter routing is kept); returns the runner's RunSummary."""
    from mlpo_agents.runner import run_team

    client = client.with_team(team)  # per-run seeded sampling; the routing (adapter versions) is the client's
    return asyncio.run(
        run_team(team, tasks, store, task_name=task_name, client=client, concurrency=concurrency, **options)
    )


def run_episodes_together(
    client: ModelClient, jobs: list[tuple[TeamConfig, list[Any], Any]], store: TraceStore, *, task_name: str,
    concurrency: int, **options: Any,
) -> list[Any]:
    """Run several (team, tasks, graph) jobs at once, so their calls share the engine's batches (the teams
    deploy the client's models: `ModelClient.with_team`); `options` go to every `run_team`. Returns one
    RunSummary per job (an empty job gives an empty summary)."""
    from mlpo_agents.runner import RunSummary, run_team

    async def run_all() -> list[Any]:
        runs = [
            run_team(team, tasks, store, task_name=task_name, client=client.with_team(team),
                     concurrency=concurrency, progress=False, graph=graph, **options)
            for team, tasks, graph in jobs if tasks
        ]  # fmt: skip
        done = iter(await asyncio.gather(*runs))
        return [next(done) if tasks else RunSummary() for _, tasks, _ in jobs]

    return asyncio.run(run_all())


# ------------------------------------------------------------------------------------------- served adapters


def load_adapter_weights(model: Any, adapter: Path) -> None:
    """Load saved adapter weights (peft folder) into a trainable LoRA copy (resume)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(adapter / "adapter_model.safetensors")))


def lora_copy(spec: str, config: RunConfig, seed: int) -> Any:
    """A trainable LoRA copy of the zoo model `spec`, initialised from `seed`; its base weights in the config's
    `train_dtype` (float32 for configs without one, e.g. MALT's), the LoRA weights in float32."""
    import torch

    from .lora import LoraSettings, attach_lora

    torch.manual_seed(seed)  # LoRA init
    dtype = getattr(config, "train_dtype", "float32")
    return attach_lora(spec, LoraSettings(r=config.lora_r, alpha=config.lora_alpha), dtype=dtype)


class TrainableLora:
    """A trainable LoRA copy of a zoo model, its AdamW optimizer, and the local engine serving its adapters
    to `role` through `client` (what `run.Run` restores, publishes and checkpoints: a `run.Trainee`)."""

    def __init__(
        self, spec: str, config: PolicyGradientConfig, seed: int, *, role: str, client: ModelClient, adapters: Path,
        prefix: str = "",
    ):  # fmt: skip
        import torch

        from mlpo_agents import zoo

        self.spec, self.base_model = spec, zoo.base_model_id(spec)
        self.tokenizer = zoo.resolve(spec)[1]
        self.model = lora_copy(spec, config, seed)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
        self.engine = role_engine(client.team, role)  # the one `hot_load` loads into
        # adapters: the folder of the published adapters (step-N); prefix: of their served version names
        self.role, self.client, self.adapters, self.prefix = role, client, adapters, prefix
        self.version = "base"
        self.folder: Path | None = None  # of the served adapter (None: the base model)

    def publish(self, step: int, folder: Path | None = None) -> Path:
        """Save the adapter as `<adapters>/step-N` (unless `folder` holds it) and hot-load it as
        `<prefix>step-N`: the role's next calls sample from it. Returns the folder."""
        target = self.adapters / f"step-{step}"
        folder = folder or save_adapter(self.model, target, self.base_model, meta={"step": step})
        self.serve(f"{self.prefix}step-{step}", folder)
        return folder

    def serve(self, name: str, folder: Path) -> None:
        """Hot-load the adapter in `folder` as `name`, route the role to it and unload the previous version."""
        hot_load(self.client, self.role, folder, name)
        previous, self.version, self.folder = self.version, name, folder
        if previous not in ("base", name):
            self.engine.unload_adapter(previous)

    def restore(self, adapter: Path) -> None:
        """Load adapter weights into the trainable copy (resume)."""
        load_adapter_weights(self.model, adapter)
