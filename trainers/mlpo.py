"""MLPO: train the leader of a leader-with-peers team with GRPO on its own traces.

Estornell et al. 2025, "Multi-Agent LLM Post-training via Optimizing the Leader" (MLPO), arXiv 2507.08960.
K frozen peers propose; one trainable leader reads the question and the proposals and answers. Each
step samples G leader completions per question (the team graph's sampling fan-out `leader_samples=G`,
one group id), scores them, and makes one GRPO update of the leader's LoRA adapter with Dr. GRPO
advantages (reward minus group mean, no std) and PPO clipping. The new adapter is saved and hot-loaded
into the engine that serves the leader, so the next step samples from it. Entry points: `MLPOConfig`,
`train` (the loop), `online_steps` / `offline_steps` (what one step does); `mlpo_eval.evaluate` (team and solo).

Fidelity — deviations from the paper, and why (each a named option where it is a choice):
- LoRA instead of full fine-tuning (CPU budget); the trained adapter is what the engine serves.
- The optimised policy is the sampled one, softmax(logits / T) at the leader's sampling temperature
  (`tempered_policy=True`, as TRL's GRPOTrainer). The engine records raw (T = 1) logprobs like vLLM, so
  the ratio's old logprobs are the tempered ones of the weights at the start of the update (detached
  current logprobs when `update_epochs=1`, where the ratio is exactly 1 and clipping only acts from the
  second epoch on). Offline mode therefore treats recorded groups as on-policy for the ratio;
  `tempered_policy=False` differentiates the raw T = 1 policy against the recorded raw logprobs instead.
- The peer pool fills as questions are first drawn (a peers-only episode per new question, `pool_samples`
  answers per peer, recorded like any call) instead of one pass over the whole train set before training.
  The easy-question filter (`easy_threshold` 0.75, `easy_filter="pool"`) reads those answers as in the
  paper: a question whose pooled peer answers are right >= 75% of the time is dropped before it is ever
  trained on. `easy_filter="leader"` uses the leader's first G samples instead (after that step's update).
- `pool_samples` = 4 samples per peer are pooled, as in the paper; the CPU learning example uses 1.
- `rounds` = 1 in training and evaluation by default (the team file's `params.rounds`); the paper
  evaluates with up to T = 5 rounds. With rounds > 1, later-round leader calls are trained on too.
- SFT warm-up (`sft_steps`) is off by default; the paper's main result is SFT warm-up + MLPO, with curated
  leader data this project does not have. The warm-up here is rejection-sampled (below), so it is opt-in.
- `solo_fraction` (0, the paper) can mix leader-alone groups (no peers) into each update.
- The reward reads the answer under the project's strict rule (a closed `<answer>` block, `\\boxed{}`,
  or a final-answer phrase ending an uncut reply); the paper reads the `<answer>` block.
- Training rollouts sample the leader at `leader_temperature` (0.7); the team file's temperature
  serves evaluation (`eval_temperature`, greedy by default) and apps.
- Dr. GRPO's constant normaliser is the leader's `max_tokens` budget.
- Optional SFT warm-up is rejection-sampled: correct leader completions of the team itself (or of a
  given trace store), not curated leader data.
- Sampling seeds are per step and per agent (the leader's G samples differ by sample index), so all
  questions of a step share the leader's random stream; bit-identical reruns need `concurrency=1`.
- A step whose groups all have equal rewards (zero advantages) makes no optimizer step.
- A format reward can be added to correctness with weight `format_weight` (0 by default, as in the paper):
  `format_reward="format"` (one `<answer>` block), `"answered"` (any answer under the strict rule) or
  `"lenient"` (the call's answer is right under the lenient rule, last number as a fallback: a denser
  signal that, unlike `answered`, never pays for a wrong answer; the rollouts then score with
  `rubric.with_call_lenient`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlpo_agents.adapters import role_spec

from .common import (
    PolicyGradientConfig,
    TrainableLora,
    load_split,
    run_episodes,
    run_episodes_together,
)
from .loop import Checkpointer, TrainLogger, progress, set_rng_state

Aggregation = str


@dataclass
class MLPOConfig(PolicyGradientConfig):
    """Everything `mlpo train --algo mlpo` can set (shared fields: `PolicyGradientConfig`); validated on construction."""

    team: str = "default"
    """Team YAML path or built-in name; its `leader` role is trained and must be served by `local/<spec>`."""
    out: str = "runs/mlpo"
    """Run folder: metrics, curves, checkpoints, adapters, traces."""
    leader_temperature: float | None = 0.7
    """Leader sampling temperature of training rollouts; the team file's temperature serves evaluation
    and apps (a team may serve a greedy leader, but GRPO needs G different samples). None: the team file's."""
    offline: bool = False
    """Train from the existing `traces` store instead of sampling new episodes."""
    clip_eps: float = 0.2
    """PPO ratio clipping epsilon."""
    kl_coef: float = 0.0
    """KL penalty to the base model (adapter disabled); 0 = off, as in the paper."""
    kl_estimator: str = "k3"
    """KL term: k3 (GRPO, DeepSeekMath eq. 4) or k3_ratio (ratio-weighted k3: TRL 1.16's default
    `use_bias_correction_kl=True`); matters only with kl_coef > 0."""
    aggregation: Aggregation = "dr_grpo"
    """Loss aggregation: dr_grpo (constant normaliser), token or sequence."""
    update_epochs: int = 1
    """Gradient steps on each step's batch (>1 makes the ratio/clipping bite)."""
    offline_epochs: int = 2
    """Offline mode: passes over the recorded groups."""
    peer_pool: bool = True
    """Reuse each question's round-0 peer proposals after the first time (pooled_peers topology)."""
    pool_samples: int = 4
    """P: samples per peer kept in the pool (each later episode uses one of them)."""
    easy_threshold: float | None = 0.75
    """Skip easy questions: those whose solve rate (see `easy_filter`) is >= this (None disables the filter)."""
    easy_filter: str = "pool"
    """What the solve rate is: `pool` (the paper) — the share of the question's K x P pooled peer answers that
    are right, measured before the question is first trained on (a peers-only pass that fills the pool);
    `leader` — the leader's first G samples of it, measured after that step's update."""
    solo_fraction: float = 0.0
    """Share of each step's questions whose G leader samples are drawn with no peers (the leader alone, as
    `mlpo_eval` measures it), trained in the same update. 0 = the paper (team context only); > 0 keeps the
    leader's solo skill in the objective, so training on the team does not trade it away."""
    sft_steps: int = 0
    """SFT warm-up optimizer steps (TRL SFTTrainer) on correct leader completions before GRPO; 0 = off."""
    sft_questions: int = 32
    """Questions rolled out to collect SFT examples when `traces` holds none."""
    sft_lr: float = 1e-4
    """SFT warm-up learning rate."""
    eval_every: int = 0
    """Also evaluate every N steps (0: only before and after)."""
    reward_name: str = "correct"
    """The per-call reward trained on: `correct` (the task's gold answer) or, offline, a reward recorded
    later, e.g. `feedback` (what an app's users sent with `Team.feedback(..., sample=i)`)."""
    resume: bool = False
    """Continue from the latest complete checkpoint in `out`."""
    baseline_from: str | None = None
    """A previous run folder with the same team, task, seed and evaluation settings: its untrained ("before")
    evaluation and evaluation peer pool are reused instead of recomputed, so a recipe sweep pays for the
    baseline once. Refused, naming the difference, when the settings differ."""

    def __post_init__(self) -> None:
        problems = []
        if self.group_size < 2:
            problems.append(f"group_size={self.group_size}: GRPO needs >= 2 samples per question")
        if self.steps < 1 or self.questions_per_step < 1 or self.train_questions < 1:
            problems.append("steps, questions_per_step and train_questions must be >= 1")
        if self.leader_temperature is not None and self.leader_temperature <= 0 and not self.offline:
            problems.append(
                f"leader_temperature={self.leader_temperature}: GRPO groups need sampling (> 0); a greedy "
                "leader gives G identical samples and no learning signal"
            )
        if self.kl_estimator not in ("k3", "k3_ratio"):
            problems.append(f"kl_estimator={self.kl_estimator!r}: use k3 or k3_ratio")
        if self.aggregation not in ("dr_grpo", "token", "sequence"):
            problems.append(f"aggregation={self.aggregation!r}: use dr_grpo, token or sequence")
        if self.lr <= 0 or self.clip_eps <= 0 or self.kl_coef < 0 or self.format_weight < 0:
            problems.append("lr and clip_eps must be > 0; kl_coef and format_weight >= 0")
        if self.reward_name != "correct" and not self.offline:
            problems.append(f"reward_name={self.reward_name!r}: online rollouts record `correct`; "
                            "train on other rewards offline (offline=True, traces=<store>)")
        if self.reward_name == "format":
            problems.append("reward_name='format': the format reward is added with format_weight")
        if self.format_reward not in ("format", "answered", "lenient"):
            problems.append(f"format_reward={self.format_reward!r}: use format, answered or lenient")
        if self.easy_filter not in ("pool", "leader"):
            problems.append(f"easy_filter={self.easy_filter!r}: use pool (the paper) or leader")
        if self.easy_filter == "pool" and self.easy_threshold is not None and not self.peer_pool and not self.offline:
            problems.append("easy_filter='pool' reads the peer pool: keep peer_pool=True or use easy_filter='leader'")
        if not 0 <= self.solo_fraction < 1:
            problems.append(f"solo_fraction={self.solo_fraction}: must be in [0, 1)")
        if self.easy_threshold is not None and not 0 < self.easy_threshold <= 1:
            problems.append(f"easy_threshold={self.easy_threshold}: must be in (0, 1] or None")
        if (
            self.update_epochs < 1
            or self.offline_epochs < 1
            or self.micro_batch_size < 1
            or self.pool_samples < 1
        ):
            problems.append("update_epochs, offline_epochs, micro_batch_size and pool_samples must be >= 1")
        if self.offline and not self.traces:
            problems.append("offline=True needs traces=<path of a trace store recorded with run_team>")
        if self.offline and self.traces and not Path(self.traces).exists():
            problems.append(f"traces={self.traces}: no such trace store")
        if problems:
            raise ValueError("invalid MLPOConfig: " + "; ".join(problems))


@dataclass
class TrainResult:
    """What `train` returns."""

    out: Path
    adapter: Path
    """The final adapter folder (peft format)."""
    steps: int
    evaluation: dict[str, dict[str, Any]]
    """{"before": {...}, "after": {...}}: team and solo accuracy on held-out questions (see `mlpo_eval.evaluate`)."""
    history: list[dict[str, Any]]
    wall_s: float

    def summary(self) -> dict[str, Any]:
        """A JSON-able digest (what `mlpo train` prints)."""
        return {
            "out": str(self.out),
            "adapter": str(self.adapter),
            "steps": self.steps,
            "evaluation": self.evaluation,
            "wall_s": round(self.wall_s, 1),
        }


# ------------------------------------------------------------------------------------------- setup


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A per-step sampling seed derived from the run seed (reproducible, different each step)."""
    return random.Random(f"mlpo/{seed}/{step}/{salt}").getrandbits(31)


def seeded_team(team: Any, seed: int, *, leader_temperature: float | None = None) -> Any:
    """A copy of `team` whose leader and every peer agent sample with their own fixed seed."""
    roles = {name: rc.model_copy(deep=True) for name, rc in team.roles.items()}
    for i, name in enumerate(
        ["leader", *[f"peer-{k}" for k in range(1, int(team.params.get("peers", 0)) + 1)]]
    ):
        rc = roles.get(name) or team.role(name).model_copy(deep=True)
        rc.sampling.seed = (seed + 7919 * i) % (1 << 31)
        if name == "leader" and leader_temperature is not None:
            rc.sampling.temperature = leader_temperature
        roles[name] = rc
    return team.model_copy(update={"roles": roles})


def leader_spec(team: Any) -> str:
    """The local engine spec serving the leader (`local/<spec>`); other deployments cannot be hot-loaded here."""
    return role_spec(
        team, "leader", "serve the leader with `local/<spec>` (or train offline from recorded traces)"
    )


class Policy(TrainableLora):
    """The trainable LoRA copy of the leader plus the serving side: engine, client and current version."""

    def __init__(self, config: MLPOConfig, team: Any, spec: str, store: Any):
        from mlpo_agents.models import ModelClient

        super().__init__(spec, config, seed=config.seed)
        self.config = config
        self.client = ModelClient(team, store)
        self.adapters = Path(config.out) / "adapters"

    def publish(self, step: int, folder: Path | None = None) -> Path:
        """Save the adapter (unless given) and hot-load it: the leader's next calls sample from it."""
        from .lora import save_adapter

        name = f"step-{step}"
        folder = folder or save_adapter(self.model, self.adapters / name, base_model=self.base_model)
        self.serve(self.client, "leader", name, folder)
        return folder


# ------------------------------------------------------------------------------------------- rollouts


def rollout(
    policy: Policy, team: Any, tasks: list[Any], store: Any, graph: Any, *, task_name: str, **options: Any
) -> Any:
    """Run the team on `tasks` with the leader's current adapter; returns the runner's RunSummary."""
    return run_episodes(
        policy.client,
        team,
        tasks,
        store,
        task_name=task_name,
        concurrency=policy.config.concurrency,
        progress=False,
        graph=graph,
        **options,
    )


def episode_batch(store: Any, summary: Any, order: list[str], policy: Policy) -> Any:
    """The leader's calls and rewards of a rollout as a TrajectoryBatch, groups in question order."""
    from .batch import load_events, traces_to_batch

    position = {task_id: i for i, task_id in enumerate(order)}
    task_of = {r.episode_id: r.task_id for r in summary.results}
    calls, rewards = load_events(store, episode_ids=list(task_of), roles=("leader",))
    calls.sort(key=lambda c: (position[task_of[c.episode_id]], c.round, c.sample_index))
    return traces_to_batch(calls, rewards, **batch_options(policy))


def batch_options(policy: Any) -> dict[str, Any]:
    """The `traces_to_batch` settings of this run (`policy`: anything with config, base_model, tokenizer)."""
    c = policy.config
    return dict(
        roles=("leader",),
        base_model=policy.base_model,
        # Only ask for a format reward when it counts: stores recorded without one stay usable.
        reward_names=(c.reward_name, c.format_reward) if c.format_weight else (c.reward_name,),
        reward_weights={c.reward_name: 1.0, c.format_reward: c.format_weight} if c.format_weight else None,
        pad_token_id=policy.tokenizer.pad_token_id or 0,
        std_scale=c.std_scale,
        max_len=c.max_len,
    )


def update(policy: Policy, batch: Any, max_tokens: int) -> dict[str, float]:
    """`update_epochs` GRPO steps on one batch (none when every group's rewards are equal: no signal).

    With `tempered_policy` the ratio's old policy is the tempered policy of the weights at the start of
    the update (see `trainers.update`): the detached current logprobs for one epoch, one no-grad forward
    before the first of several.
    """
    from .update import OldLogprobs, policy_update, with_current_logprobs

    c = policy.config
    if c.kl_coef == 0 and not batch.advantages.any():
        # A zero gradient would still move the weights through Adam's momentum; skip the step instead.
        return {"loss": 0.0, "grad_norm": 0.0, "update_skipped": 1.0}
    old_logprobs: OldLogprobs = "batch"
    if c.tempered_policy and c.update_epochs == 1:
        old_logprobs = "current"
    elif c.tempered_policy:
        batch = with_current_logprobs(
            policy.model, batch, tempered_policy=True, micro_batch_size=c.micro_batch_size
        )
    for _ in range(c.update_epochs):
        metrics = policy_update(
            policy.model,
            policy.optimizer,
            batch,
            loss="grpo",
            micro_batch_size=c.micro_batch_size,
            max_grad_norm=c.max_grad_norm,
            tempered_policy=c.tempered_policy,
            old_logprobs=old_logprobs,
            clip_eps=c.clip_eps,
            kl_coef=c.kl_coef,
            kl_estimator=c.kl_estimator,
            aggregation=c.aggregation,
            max_tokens=max_tokens,
        )
    return metrics


def batch_metrics(batch: Any) -> dict[str, float]:
    """Reward and batch statistics for the log."""
    return {
        "reward/mean": batch.rewards.mean().item(),
        "batch/rows": len(batch),
        "batch/completion_tokens": batch.completion_lengths.float().mean().item(),
        **{
            f"batch/{k}": v
            for k, v in batch.stats.as_dict().items()
            if k in ("groups", "zero_advantage_groups", "dropped")
        },
    }


# ------------------------------------------------------------------------------------------- SFT warm-up


def sft_warmup(policy: Policy, examples: list[Any]) -> dict[str, float]:
    """TRL SFTTrainer on pre-tokenized leader completions (token-exact: loss on completion tokens only)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    c = policy.config
    if not examples:
        raise ValueError(
            "SFT warm-up found no correct leader completions; lower sft_steps to 0 or pass traces"
        )
    rows = [
        {
            "input_ids": e.prompt_token_ids + e.completion_token_ids,
            "labels": [-100] * len(e.prompt_token_ids) + e.completion_token_ids,
        }
        for e in examples
    ]
    args = SFTConfig(
        output_dir=str(Path(c.out) / "sft"),
        max_steps=c.sft_steps,
        learning_rate=c.sft_lr,
        per_device_train_batch_size=min(4, len(rows)),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=c.seed,
        use_cpu=True,
        max_length=None,
        dataloader_num_workers=0,
        disable_tqdm=True,
        gradient_checkpointing=False,  # TRL's default (True) would stay on for the GRPO steps after it
    )
    trainer = SFTTrainer(
        model=policy.model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=policy.tokenizer,
    )
    output = trainer.train()
    policy.model.eval()
    return {"sft/loss": float(output.training_loss), "sft/examples": len(rows)}


def correct_leader_calls(store: Any, base_model: str, episode_ids: list[str] | None = None) -> list[Any]:
    """Leader calls of `base_model` with correctness 1 (and a well-formed answer), one per prompt+text."""
    from .batch import load_events

    calls, rewards = load_events(store, episode_ids=episode_ids, roles=("leader",))
    good = {r.call_id for r in rewards if r.name == "correct" and r.call_id and r.value >= 1.0}
    seen, out = set(), []
    for c in calls:
        key = (tuple(c.prompt_token_ids), c.text)
        if c.call_id in good and c.base_model == base_model and c.completion_token_ids and key not in seen:
            seen.add(key)
            out.append(c)
    return out


# ------------------------------------------------------------------------------------------- training


def train(config: MLPOConfig) -> TrainResult:
    """Run MLPO (online or offline) as configured; returns the final adapter, evaluation and history."""
    from mlpo_agents.config import load_team
    from mlpo_agents.trace import TraceStore

    from .mlpo_eval import (
        BASELINE,
        baseline_fingerprint,
        eval_metrics,
        evaluate,
        load_baseline,
    )

    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    team = load_team(config.team)
    spec = leader_spec(team)
    sampled_at = config.leader_temperature
    if sampled_at is None:
        sampled_at = team.role("leader").sampling.temperature
    if not config.offline and sampled_at is not None and sampled_at <= 0:
        raise ValueError(
            f"team {team.name!r} serves a greedy leader (temperature {sampled_at}): GRPO needs G different "
            "samples per question; set leader_temperature (e.g. --set leader_temperature=0.7)"
        )
    store = TraceStore(config.traces or out / "traces.sqlite")
    recorded = (
        offline_batch(config, spec, store) if config.offline else None
    )  # fail fast, before loading models
    policy = Policy(config, team, spec, store)
    logger = TrainLogger(out, dataclasses.asdict(config), resume=config.resume)
    checkpointer = Checkpointer(out, config.save_every)
    state: dict[str, Any] = {"cursor": 0, "easy": [], "pool": None, "evaluation": {}}
    first_step = 0

    checkpoint = checkpointer.latest() if config.resume else None
    if checkpoint is not None:
        policy.restore(checkpoint.adapter)
        policy.optimizer.load_state_dict(checkpoint.optimizer_state())
        set_rng_state(checkpoint.rng())
        state, first_step = checkpoint.state, checkpoint.step
        policy.publish(first_step, checkpoint.adapter)
        logger.truncate(first_step)
    elif config.resume:
        print(f"no checkpoint in {checkpointer.root}: starting from step 0")

    if first_step == 0 and config.eval_questions and "before" not in state["evaluation"]:
        fingerprint = baseline_fingerprint(config, team)
        if config.baseline_from:
            state["evaluation"]["before"], state["eval_pool"] = load_baseline(config.baseline_from, fingerprint)
            print(f"reusing the untrained evaluation of {config.baseline_from}")
        else:
            state["evaluation"]["before"] = evaluate(policy, team, config, label="before", state=state)
        (out / BASELINE).write_text(
            json.dumps(
                {"fingerprint": fingerprint, "before": state["evaluation"]["before"], "eval_pool": state["eval_pool"]}
            )
        )
        logger.log(0, eval_metrics(state["evaluation"]["before"]))
    if first_step == 0 and config.sft_steps and not state.get("sft_done"):
        metrics = sft_warmup(policy, collect_sft_examples(policy, team, config, store))
        policy.publish(0)
        state["sft_done"] = True
        logger.log(0, metrics)

    steps = (
        offline_steps(policy, config, *recorded)
        if recorded is not None
        else online_steps(policy, team, config, store, state)
    )
    bar = progress(config.steps, first_step, config.progress)
    step, train_start = first_step, time.perf_counter()  # max_minutes counts training steps, not evaluation
    for step in range(first_step + 1, config.steps + 1):
        metrics = steps(step)
        policy.publish(step)
        metrics["version"] = policy.version
        if config.eval_every and step % config.eval_every == 0 and step < config.steps:
            metrics.update(eval_metrics(evaluate(policy, team, config, label=f"step{step}", state=state)))
        logger.log(step, metrics)
        out_of_time = (
            config.max_minutes is not None and time.perf_counter() - train_start > 60 * config.max_minutes
        )
        if checkpointer.due(step, last=step == config.steps or out_of_time):
            checkpointer.save(
                step,
                model=policy.model,
                optimizer=policy.optimizer,
                state=state,
                base_model=policy.base_model,
            )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                reward=f"{metrics.get('reward/mean', float('nan')):.2f}", loss=f"{metrics['loss']:.3f}"
            )
        if out_of_time:
            print(f"stopping after step {step}: max_minutes={config.max_minutes} reached")
            break
    if bar is not None:
        bar.close()

    if config.eval_questions:
        state["evaluation"]["after"] = evaluate(policy, team, config, label="after", state=state)
        logger.log(step, eval_metrics(state["evaluation"]["after"]))
    logger.close()
    store.close()
    return TrainResult(
        out,
        policy.adapters / policy.version if step else Path(),
        step,
        state["evaluation"],
        logger.history,
        time.perf_counter() - start,
    )


def online_steps(policy: Policy, team: Any, config: MLPOConfig, store: Any, state: dict[str, Any]) -> Any:
    """A function `step -> metrics` that samples this step's questions with the team and updates the leader."""
    from mlpo_agents.graphs import build_topology
    from mlpo_agents.graphs.pooled_peers import PeerPool

    questions = load_split(config, "train", config.train_questions)
    random.Random(config.seed).shuffle(questions)
    peers = int(team.params.get("peers", 0))
    params = {**team.params, "leader_samples": config.group_size}
    pool = PeerPool.from_json(state["pool"]) if state.get("pool") else PeerPool()
    if config.peer_pool and peers > 0 and team.topology == "leader_peers":
        graph = build_topology(
            "mlpo_agents.graphs.pooled_peers:build_pooled_peers",
            **params,
            pool=pool,
            pool_samples=config.pool_samples,
        )
    else:
        graph = build_topology(team.topology, **params)
    easy = set(state["easy"])
    max_tokens = team.role("leader").sampling.max_tokens
    prefilter = config.easy_threshold is not None and config.easy_filter == "pool" and peers > 0
    fill = (
        build_topology(
            "mlpo_agents.graphs.pooled_peers:build_peer_fill", peers=peers, pool=pool, pool_samples=config.pool_samples
        )
        if prefilter
        else None
    )

    def screen(candidates: list[Any], n: int) -> list[Any]:
        """The paper's filter: pool the peers' answers of questions not yet pooled, drop the easy ones."""
        fresh = [t for t in candidates if t.id not in pool]
        if fill is not None and fresh:
            seeded = seeded_team(team, step_seed(config.seed, n, salt=2))
            summary = rollout(policy, seeded, fresh, store, fill, task_name=config.task, score_roles=("peer",))
            rates = solve_rates(store, summary, role="peer")
            easy.update(task_id for task_id, rate in rates.items() if rate >= config.easy_threshold)  # type: ignore[operator]
        return [t for t in candidates if t.id not in easy]

    def next_questions(n: int) -> list[Any]:
        chosen: list[Any] = []
        scanned = 0
        while len(chosen) < config.questions_per_step and scanned < len(questions):
            candidates: list[Any] = []
            while len(chosen) + len(candidates) < config.questions_per_step and scanned < len(questions):
                task = questions[state["cursor"] % len(questions)]
                state["cursor"] += 1
                scanned += 1
                if task.id not in easy:
                    candidates.append(task)
            chosen += screen(candidates, n) if prefilter else candidates
        if not chosen:
            raise RuntimeError(
                f"every train question is solved >= {config.easy_threshold} of the time; "
                "use harder questions or raise easy_threshold"
            )
        return chosen

    solo_count = min(round(config.questions_per_step * config.solo_fraction), config.questions_per_step - 1)
    if solo_count and team.topology != "leader_peers":
        raise ValueError(f"solo_fraction needs the leader_peers topology (peers=0 is the leader alone), not {team.topology!r}")
    solo_graph = build_topology(team.topology, **{**params, "peers": 0}) if solo_count else None

    def step(n: int) -> dict[str, Any]:
        tasks = next_questions(n)
        solo, tasks = tasks[:solo_count], tasks[solo_count:]
        pool.pick = n  # each reuse shows another pooled peer sample when pool_samples > 1
        hits = pool.hits
        t0 = time.perf_counter()
        seeded = seeded_team(team, step_seed(config.seed, n), leader_temperature=config.leader_temperature)
        summary, solo_summary = run_episodes_together(
            policy.client, seeded, [(tasks, graph), (solo, solo_graph)], store,
            task_name=config.task, concurrency=config.concurrency,
        )  # fmt: skip
        solo_summary = solo_summary if solo else None
        rollout_s = time.perf_counter() - t0
        order = [t.id for t in solo + tasks]
        batch = episode_batch(store, merged(summary, solo_summary), order, policy)
        rates = solve_rates(store, summary)
        if config.easy_threshold is not None and config.easy_filter == "leader":
            easy.update(task_id for task_id, rate in rates.items() if rate >= config.easy_threshold)
        state["easy"], state["pool"] = sorted(easy), pool.to_json()
        metrics = update(policy, batch, max_tokens)
        extra = {}
        if solo_summary is not None:
            solo_rates = solve_rates(store, solo_summary)
            extra["reward/correct_solo"] = sum(solo_rates.values()) / max(len(solo_rates), 1)
        return {
            **metrics,
            **batch_metrics(batch),
            "reward/correct": sum(rates.values()) / max(len(rates), 1),
            **extra,
            "rollout_s": rollout_s,
            "team_accuracy_train": summary.accuracy,
            "easy_questions": len(easy),
            "pool/hits": pool.hits - hits,
        }

    return step


def merged(summary: Any, other: Any | None) -> Any:
    """The episode results of two rollouts, as one summary-like object for `episode_batch`."""
    from types import SimpleNamespace

    return summary if other is None else SimpleNamespace(results=[*other.results, *summary.results])


def solve_rates(store: Any, summary: Any, role: str = "leader") -> dict[str, float]:
    """Per question of a rollout: the fraction of its `role` samples that were correct."""
    task_of = {r.episode_id: r.task_id for r in summary.results}
    leader = {c.call_id for c in store.calls(episode_id=list(task_of), role=role)}
    values: dict[str, list[float]] = {}
    for r in store.rewards(episode_id=list(task_of), name="correct"):
        if r.call_id in leader:
            values.setdefault(task_of[r.episode_id], []).append(r.value)
    return {task_id: sum(v) / len(v) for task_id, v in values.items()}


def offline_batch(config: MLPOConfig, spec: str, store: Any) -> tuple[Any, int]:
    """Every usable leader group of `store` as one batch, and the generation budget it was sampled with."""
    from types import SimpleNamespace

    from mlpo_agents import zoo

    from .batch import load_events, traces_to_batch

    run = SimpleNamespace(config=config, base_model=zoo.base_model_id(spec), tokenizer=zoo.resolve(spec)[1])

    calls, rewards = load_events(store, roles=("leader",))
    if not calls:
        raise ValueError(
            f"offline mode: {config.traces} has no leader calls; record episodes with `mlpo run` first"
        )
    try:
        full = traces_to_batch(calls, rewards, **batch_options(run))
    except ValueError as e:
        raise type(e)(f"offline mode on {config.traces}: {e}") from None
    # Dr. GRPO's constant: the generation budget the traces were sampled with.
    return full, int(calls[0].sampling.get("max_tokens") or full.completion_lengths.max())


def offline_steps(policy: Policy, config: MLPOConfig, full: Any, max_tokens: int) -> Any:
    """A function `step -> metrics` over the recorded groups, `offline_epochs` passes, shuffled per epoch."""
    groups = len(full.group_ids)
    per_epoch = math.ceil(groups / config.questions_per_step)
    order: list[int] = []
    for epoch in range(config.offline_epochs):
        perm = list(range(groups))
        random.Random(f"{config.seed}/{epoch}").shuffle(perm)
        order += perm

    def step(n: int) -> dict[str, Any]:
        chunk = (n - 1) % (per_epoch * config.offline_epochs)
        chosen = set(order[chunk * config.questions_per_step : (chunk + 1) * config.questions_per_step])
        rows = [b for b in range(len(full)) if int(full.group_index[b]) in chosen]
        batch = full.select(rows)
        metrics = update(policy, batch, max_tokens)
        return {**metrics, **batch_metrics(batch), "epoch": chunk // per_epoch}

    return step


def collect_sft_examples(policy: Policy, team: Any, config: MLPOConfig, store: Any) -> list[Any]:
    """Correct leader completions for the warm-up: from the store if it has some, else a fresh rollout."""
    from mlpo_agents.graphs import build_topology

    found = correct_leader_calls(store, policy.base_model)
    if found or config.offline:
        return found
    tasks = load_split(config, "train", config.sft_questions, seed=config.seed + 1)
    params = {**team.params, "leader_samples": config.group_size}
    summary = rollout(
        policy,
        seeded_team(team, step_seed(config.seed, 0, salt=1), leader_temperature=config.leader_temperature),
        tasks,
        store,
        build_topology(team.topology, **params),
        task_name=config.task,
    )
    return correct_leader_calls(store, policy.base_model, [r.episode_id for r in summary.results])
