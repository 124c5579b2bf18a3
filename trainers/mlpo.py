"""MLPO: train the leader of a leader-with-peers team with GRPO on its own traces.

Estornell et al. 2025, "Multi-Agent LLM Post-training via Optimizing the Leader" (MLPO), arXiv 2507.08960.
K frozen peers propose; one trainable leader reads the question and the proposals and answers. Each
step samples G leader completions per question (the team graph's sampling fan-out `leader_samples=G`,
one group id), scores them, and makes one GRPO update of the leader's LoRA adapter with Dr. GRPO
advantages (reward minus group mean, no std) and PPO clipping. The new adapter is saved and hot-loaded
into the engine that serves the leader, so the next step samples from it. Read top to bottom: `MLPOConfig`,
`MLPOState` (what a checkpoint carries), `Policy` (the leader's LoRA copy and its engine), `train` (setup, then
`run.run_training`); what one step does is `mlpo_steps` (`OnlineSteps`, `offline_steps`); evaluation (team and
solo) is `mlpo_eval.evaluate`.

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
  `common.shaping_rubric`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlpo_agents.adapters import role_spec

from .common import FORMAT_REWARDS, PolicyGradientConfig, TrainableLora, shaping_rubric, train_dtype_problems
from .mlpo_eval import evaluate_run
from .mlpo_steps import OnlineSteps, offline_batch, offline_steps, warm_up
from .run import Run, RunState, TrainResult, run_training

if TYPE_CHECKING:
    from mlpo_agents.config import TeamConfig
    from mlpo_agents.trace import TraceStore


__all__ = ["MLPOConfig", "MLPOState", "Policy", "TrainResult", "leader_spec", "train"]

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
        if self.format_reward not in FORMAT_REWARDS:
            problems.append(f"format_reward={self.format_reward!r}: use format, answered or lenient")
        problems += train_dtype_problems(self)
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
class MLPOState(RunState):
    """What an MLPO run carries from step to step and in its checkpoints (with `RunState.evaluation`)."""

    cursor: int = 0
    """Train questions drawn so far (the next step starts at this index, modulo the question list)."""
    easy: list[str] = field(default_factory=list)
    """Ids of the questions found easy (never trained on again)."""
    pool: dict[str, Any] | None = None
    """The training peer pool (`PeerPool.to_json`)."""
    eval_pool: dict[str, Any] | None = None
    """The evaluation peer pool: every evaluation of the run shows the leader the same proposals."""


def leader_spec(team: TeamConfig) -> str:
    """The local engine spec serving the leader (`local/<spec>`); other deployments cannot be hot-loaded here."""
    return role_spec(
        team, "leader", "serve the leader with `local/<spec>` (or train offline from recorded traces)"
    )


class Policy(TrainableLora):
    """The trainable LoRA copy of the leader plus the serving side: engine, client and current version."""

    def __init__(self, config: MLPOConfig, team: TeamConfig, spec: str, store: TraceStore):
        from mlpo_agents.models import ModelClient

        adapters = Path(config.out) / "adapters"
        super().__init__(spec, config, config.seed, role="leader", client=ModelClient(team, store), adapters=adapters)
        self.config = config


def train(config: MLPOConfig) -> TrainResult:
    """Run MLPO (online or offline) as configured; returns the final adapter, evaluation and history."""
    from mlpo_agents.config import load_team
    from mlpo_agents.trace import TraceStore

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
    store = TraceStore(config.traces or Path(config.out) / "traces.sqlite")
    recorded = offline_batch(config, spec, store) if config.offline else None  # fail fast, before loading models
    state = MLPOState()
    run = Run(config, state, save_every=config.save_every)
    policy = Policy(config, team, spec, store)
    run.resume({"leader": run.out}, {"leader": policy})  # on resume, `state` is the checkpoint's
    with rollout_rubric(config):
        result = run_training(
            run,
            offline_steps(policy, config, *recorded) if recorded else OnlineSteps(policy, team, config, store, state),
            steps=config.steps,
            evaluate=lambda label: evaluate_run(policy, team, config, state, label),
            eval_every=config.eval_every,
            warmup=(lambda: warm_up(policy, team, config, store)) if config.sft_steps else None,
            max_minutes=config.max_minutes,
        )
    store.close()
    return result


def rollout_rubric(config: MLPOConfig) -> contextlib.AbstractContextManager[Any]:
    """The rubric of this run's rollouts (`common.shaping_rubric`); offline runs roll nothing out."""
    return contextlib.nullcontext() if config.offline else shaping_rubric(config)
