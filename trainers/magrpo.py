"""MAGRPO: train every agent of a cooperating team from one joint reward per joint action.

Liu et al. 2025, "LLM Collaboration with Multi-Agent Reinforcement Learning" (MAGRPO), arXiv 2508.04652;
reference implementation OpenMLRL/CoMLRL. N agents, each with its own policy, act on a shared task; at
each node of the rollout the team samples G joint actions, a joint reward R_g scores each, and every
agent i minimises loss_i = -(1/G) sum_g A_g * sum_t log pi_i(o_{i,g,t}) with A_g = R_g - mean_g R
(`losses.magrpo_loss`). Read top to bottom: `MAGRPOConfig` → the team and its `Agent`s → one step
(`JointSteps`: rollout, joint actions, one update per agent) → `train` (setup, then `run.run_training`);
joint actions from traces (`joint_actions`, `joint_returns`, `agent_batches`, pure) are `magrpo_joint`; the
answering agent's solo groups (`solo_fraction`, off by default) are `magrpo_solo`.

Setting here: the `cooperate` topology (graphs/cooperate.py): a drafter writes a plan, a solver answers
from it, both trainable; or the paper's own code setting, the `code_pair` topology (graphs/code_pair.py):
a helper writes `aux`, the main agent the task's entry point, scored as one program by the unit tests
(`JOINT_TOPOLOGIES` says which roles and fan-out parameter each uses). One joint action is a chain of
calls of one turn linked by `parent_call_id` (draft → answer, aux → main); its reward is the last call's
call-level reward (correctness, plus `format_weight` x the `format_reward` shaping entry: `format`,
`answered` or `lenient`, as in MLPO; for `code_pair` that of the joint program). Sibling joint actions
(same context) are those whose first call shares the first agent's group id. Each step: rollouts through
`run_team` on the local engine serving the current adapters → traces → joint actions → one batch per
agent → `trainers.update.policy_update(loss="magrpo")` per agent → save + hot-load every adapter
(`adapters.hot_load`) → repeat. Evaluation (`magrpo_eval.evaluate`): the
team's joint accuracy and the answering agent's alone, per question, before and after training.

Fidelity (paper: Liu et al. 2025, §4 and Alg. 1; reference code: OpenMLRL/CoMLRL,
comlrl/trainers/reinforce/magrpo.py, `MAGRPOTrainer`; pinned by tests/test_magrpo.py):
- Advantage: A_g = R_g - mean_g R, no std (CoMLRL `advantage_mode="mean"`). Ours: the same by default;
  `std_scale=True` divides by the group std (+ `losses.STD_EPS`).
- Loss: -(1/G) sum_g A_g sum_t log pi_i, no ratio, no clipping, no length normalisation; the mean over a
  batch of nodes. Ours: the same (`losses.magrpo_loss`), over every node of a step.
- Returns (multi-turn): R_j = r_j + gamma * mean(returns of the node that branched from joint action j),
  gamma 0.9. Ours: the same (`joint_returns`).
- Early termination: CoMLRL stops a whole *node* (the G joint actions of one context) from branching
  when the node's mean reward exceeds `termination_threshold` (strict >); otherwise every joint action
  of the node branches. Ours: the same rule (`threshold`, None = never, as CoMLRL with None). The graph
  is asked to branch every joint action and `joint_actions` drops the subtrees of terminated nodes, so
  rollouts of `turns` > 1 sample those subtrees for nothing (a graph-side node rule would save them).
- Sampling: CoMLRL temperature 0.6, top-p 0.6, top-k 50. Ours (built-in team): temperature 0.6, top-p
  0.6; no top-k (the local engine has none).
- Gradient clipping: CoMLRL none. Ours: none (`max_grad_norm=0`; 1.0 was the earlier default).
- Deviations, each a choice:
  - `tempered_policy=True` (default): the loss differentiates the sampled policy softmax(logits / T);
    CoMLRL differentiates log_softmax(logits) at T = 1 while sampling at 0.6. `tempered_policy=False`
    reproduces CoMLRL.
  - Optimizer steps: CoMLRL buffers nodes per agent and steps once per `train_batch_size` (2) nodes of
    one turn; ours makes one step per agent per training step over every node of all turns of
    `questions_per_step` questions (with turns=1, `questions_per_step=2` is CoMLRL's granularity).
  - The agents act in sequence (the solver reads the draft), not simultaneously on the same prompt.
    Aligned joint action g = (draft g, the answer to draft g): the solver's G calls have G different
    prompts. `joint_mode="cross"` samples G answers per draft (G x G joint actions per node); the
    drafter's row for draft i then carries the *mean* return of its G joint actions (CoMLRL: the sum),
    which scales the drafter's advantage by 1/G (a learning-rate factor).
  - `code_pair` (the paper's code setting; docs/trainers/magrpo.md): the reward is the binary unit-test
    verdict of the joint program, not CoMLRL's levelled code reward; one turn only; cross mode calls the
    main agent once per helper sample with one seed (G x G calls repeating the same G samples, so the
    main agent's summed gradient is CoMLRL's, scaled by 1/G like the helper's).
  - LoRA adapters (one per agent; CPU budget) instead of CoMLRL's full fine-tuning; agents on the same
    base share one serving engine (one adapter each) but each trainer copy holds its own base weights.
  - Turn t>0 prompts tell the drafter whether the answer was accepted: that feedback comes from the
    task's grader (as test feedback does in the paper's code tasks), so multi-turn team accuracy is not
    a fair single-attempt accuracy; evaluation here always uses one turn.
  - Advantages are computed per agent over that agent's usable rows of the group (`traces_to_batch`);
    when a call fails or a row is too long, its joint action drops out of every agent's batch, but
    rows with unequal numbers of usable children (cross mode) are not re-weighted.
  - On-policy only: no importance ratio (as in the paper), hence no offline mode from old traces.
  - Sampling is seeded per agent and step (reproducible runs): all of an agent's calls in one step
    share the engine's per-request seed, so two identical prompts would get identical samples; the
    aligned solver prompts differ because they hold different drafts.
  - `solo_fraction` (0 = the paper): that share of each step's questions is asked to the answering agent
    alone (as `magrpo_eval` asks it, G samples each, A = R - mean R per question), trained in its update
    beside its joint actions; other agents get no rows from them (`magrpo_solo`). Why: trained on joint
    actions only, the solver lost its solo skill (word_problems: alone 0.175 -> 0.020 while the team rose
    0.025 -> 0.155, so the trained team merely matched the untrained single agent).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlpo_agents.adapters import role_spec

from .common import (
    FORMAT_REWARDS,
    PolicyGradientConfig,
    TrainableLora,
    load_split,
    run_episodes_together,
    shaping_rubric,
    train_dtype_problems,
)
from .magrpo_eval import evaluate
from .magrpo_joint import (
    JOINT_TOPOLOGIES,
    JointAction,
    JointTopology,
    agent_batches,
    for_team,
    graph_params,
    joint_actions,
    joint_returns,
    reward_weights,
)
from .magrpo_solo import SOLO_AGENT, SoloGroups, solo_actions, solo_count, solo_metrics
from .run import Run, RunState, TrainResult, run_training, seeded_team, step_seed

if TYPE_CHECKING:
    from mlpo_agents.config import TeamConfig
    from mlpo_agents.models import ModelClient
    from mlpo_agents.runner import RunSummary
    from mlpo_agents.tasks.base import Task
    from mlpo_agents.trace import TraceStore

    from .batch import TrajectoryBatch


__all__ = [
    "JOINT_TOPOLOGIES", "Agent", "JointAction", "JointTopology", "MAGRPOConfig", "MAGRPOState", "TrainResult",
    "agent_batches", "cooperate_team", "for_team", "graph_params", "joint_actions", "joint_returns", "train",
]  # fmt: skip


# ------------------------------------------------------------------------------------------- config


@dataclass
class MAGRPOConfig(PolicyGradientConfig):
    """Everything `mlpo train --algo magrpo` can set (shared fields: `PolicyGradientConfig`); validated on construction."""

    team: str | None = None
    """Team YAML path or built-in name; None builds the two-agent `cooperate` team on `model`."""
    model: str = "smollm2-135m"
    """Zoo spec serving every agent of the built-in team (`local/<spec>`)."""
    agent_models: dict[str, str] = field(default_factory=dict)
    """Built-in team: role -> zoo spec for agents on separate base models (e.g. {"solver": "tiny-test"})."""
    agents: tuple[str, ...] = ("drafter", "solver")
    """The trainable agent roles (each gets its own LoRA adapter). Left at this default with a `code_pair`
    team: ("helper", "main") (`JOINT_TOPOLOGIES`)."""
    answer_role: str = "solver"
    """The role whose call ends a joint action; its call-level rewards are the joint reward (`main` for a
    `code_pair` team when `agents` and this are left at their defaults)."""
    out: str = "runs/magrpo"
    """Run folder: metrics, curves, checkpoints, adapters, traces."""
    offline: bool = False
    """Not supported: MAGRPO is on-policy (no importance ratio); kept so `--offline` fails with the reason."""
    joint_mode: str = "aligned"
    """`aligned` (answer i reads draft i: G joint actions) or `cross` (G answers per draft: G x G)."""
    turns: int = 1
    """Turns per episode; each joint action of a node that did not terminate branches into a node of G next turn."""
    gamma: float = 0.9
    """Discount of later turns' returns."""
    threshold: float | None = None
    """Early termination (CoMLRL `termination_threshold`): a node whose mean joint reward exceeds this (strict >)
    does not branch into the next turn; None = every node branches until `turns`."""
    temperature: float = 0.6
    """Built-in team: sampling temperature of every agent (CoMLRL 0.6)."""
    top_p: float = 0.6
    """Built-in team: nucleus sampling top-p of every agent (CoMLRL 0.6)."""
    max_grad_norm: float = 0.0
    """Gradient clipping norm per agent; 0 = none (CoMLRL clips nothing)."""
    max_tokens: int = 128
    """Built-in team: completion budget of every agent."""
    resume: bool = False
    """Continue from the latest step every agent has a complete checkpoint of."""
    solo_fraction: float = 0.0
    """Share of each step's questions asked to `answer_role` alone (G samples each) and trained in the same
    update; 0 = the paper. Not in the paper: trained on joint actions only, the answering agent loses its solo
    skill (`magrpo_solo`)."""
    solo_from_step: int = 0
    """Solo groups begin after this many steps of joint actions only (0: from the first step). README recipe B:
    25 steps as the paper, then `solo_fraction` 0.25."""

    def __post_init__(self) -> None:
        self.agents = tuple(self.agents)
        problems = []
        if self.group_size < 2:
            problems.append(f"group_size={self.group_size}: MAGRPO needs G >= 2 joint actions per node")
        if self.joint_mode not in ("aligned", "cross"):
            problems.append(f"joint_mode={self.joint_mode!r}: use aligned or cross")
        if self.turns < 1 or self.steps < 1 or self.questions_per_step < 1 or self.train_questions < 1:
            problems.append("turns, steps, questions_per_step and train_questions must be >= 1")
        if not 0.0 <= self.gamma <= 1.0:
            problems.append(f"gamma={self.gamma}: must be in [0, 1]")
        if not self.agents or self.answer_role not in self.agents:
            problems.append(f"answer_role={self.answer_role!r} must be one of agents={list(self.agents)}")
        if self.lr <= 0 or self.format_weight < 0 or self.max_tokens < 1 or self.temperature < 0:
            problems.append("lr and max_tokens must be > 0; format_weight and temperature >= 0")
        if self.format_reward not in FORMAT_REWARDS:
            problems.append(f"format_reward={self.format_reward!r}: use one of {', '.join(FORMAT_REWARDS)}")
        problems += train_dtype_problems(self)
        if not 0 < self.top_p <= 1 or self.max_grad_norm < 0:
            problems.append(f"top_p={self.top_p} must be in (0, 1] and max_grad_norm >= 0")
        if not 0 <= self.solo_fraction < 1:
            problems.append(f"solo_fraction={self.solo_fraction}: must be in [0, 1) (the share of each step's questions asked to the answering agent alone; the rest go to the team)")
        if self.micro_batch_size < 1 or self.concurrency < 1 or self.solo_from_step < 0:
            problems.append("micro_batch_size and concurrency must be >= 1, solo_from_step >= 0")
        if self.offline:
            problems.append(
                "offline=True: MAGRPO is on-policy (REINFORCE with a group baseline, no importance ratio), "
                "so it cannot train on traces from older policies; drop --offline"
            )
        unknown = set(self.agent_models) - set(self.agents)
        if unknown:
            problems.append(
                f"agent_models names {sorted(unknown)}, which are not in agents={list(self.agents)}"
            )
        if problems:
            raise ValueError("invalid MAGRPOConfig: " + "; ".join(problems))


@dataclass
class MAGRPOState(RunState):
    """What a MAGRPO run carries from step to step and in its checkpoints (with `RunState.evaluation`)."""

    cursor: int = 0
    """Train questions drawn so far (the next step starts at this index, modulo the question list)."""


# ------------------------------------------------------------------------------------------- team and agents


def cooperate_team(config: MAGRPOConfig) -> Any:
    """The built-in team: drafter and solver on `local/<model>` (or `agent_models`), both trainable."""
    from mlpo_agents.config import parse_team

    specs = {role: config.agent_models.get(role, config.model) for role in config.agents}
    names = {spec: f"m{i}" for i, spec in enumerate(dict.fromkeys(specs.values()))}
    sampling = {"temperature": config.temperature, "top_p": config.top_p, "max_tokens": config.max_tokens}
    return parse_team(
        {
            "name": "cooperate",
            "topology": "cooperate",
            "model_list": [
                {"model_name": n, "litellm_params": {"model": f"local/{s}"}} for s, n in names.items()
            ],
            "router_settings": {"num_retries": 0, "timeout": 600},
            "roles": {
                r: {"model": names[s], "trainable": True, "sampling": sampling} for r, s in specs.items()
            },
        },
        "built-in cooperate team",
    )


class Agent(TrainableLora):
    """One trainable agent: a LoRA copy of its base model, its optimizer, and the engine serving it."""

    def __init__(self, role: str, spec: str, config: MAGRPOConfig, index: int, client: ModelClient):
        adapters, seed = Path(config.out) / "adapters" / role, config.seed + 1000 * index  # LoRA init per agent
        super().__init__(spec, config, seed, role=role, client=client, adapters=adapters, prefix=f"{role}-")
        self.pad_token_id = self.tokenizer.pad_token_id or 0


def agent_spec(team: TeamConfig, role: str) -> str:
    """The local engine spec serving `role`; other deployments cannot be hot-loaded with new adapters."""
    return role_spec(team, role, "serve every trained agent with `local/<spec>`")


def agent_team(team: TeamConfig, config: MAGRPOConfig, seed: int, temperature: float | None = None) -> Any:
    """`team` with every trained agent sampling with its own seed (`run.seeded_team`), optionally at `temperature`."""
    temperatures = dict.fromkeys(config.agents, temperature)
    return seeded_team(team, seed, roles=config.agents, temperatures=temperatures)


# ------------------------------------------------------------------------------------------- one step


def rollout(jobs: list[tuple[TeamConfig, list[Task], Any]], store: TraceStore, client: ModelClient, config: MAGRPOConfig) -> list[Any]:
    """Run the step's (team, tasks, graph) jobs together with every agent's current adapter; one RunSummary each."""
    roles = (*config.agents, SOLO_AGENT) if len(jobs) > 1 else config.agents  # the agent alone is `leader`
    return run_episodes_together(
        client, jobs, store, task_name=config.task, concurrency=config.concurrency, score_roles=roles
    )


class JointSteps:
    """`step(n) -> metrics` of MAGRPO: roll out the step's questions (G joint actions per node), read the joint
    actions and their returns from the traces, and update every agent on its own batch."""

    def __init__(
        self, agents: dict[str, Agent], team: TeamConfig, config: MAGRPOConfig, store: TraceStore, client: ModelClient, state: MAGRPOState
    ):
        from mlpo_agents.graphs import build_topology

        self.agents, self.config, self.store, self.client, self.state = agents, config, store, client, state
        self.questions = load_split(config, "train", config.train_questions)
        random.Random(config.seed).shuffle(self.questions)
        params = graph_params(config, team)
        self.team = team.model_copy(update={"params": params})
        self.graph = build_topology(team.topology, **params)
        self.solo_count = solo_count(config)
        self.solo = SoloGroups(team, config) if self.solo_count else None

    def __call__(self, n: int) -> dict[str, Any]:
        config, questions, agents = self.config, self.questions, self.agents
        tasks = [questions[(self.state.cursor + i) % len(questions)] for i in range(config.questions_per_step)]
        self.state.cursor += config.questions_per_step
        count = self.solo_count if n > config.solo_from_step else 0
        solo, tasks = tasks[:count], tasks[count:]
        t0 = time.perf_counter()
        jobs = [(agent_team(self.team, config, step_seed(config.seed, n)), tasks, self.graph)]
        if self.solo is not None and solo:
            alone = self.solo.seeded(agents[config.answer_role], step_seed(config.seed, n, "solo"))
            jobs.append((alone, solo, self.solo.graph))
        summaries = rollout(jobs, self.store, self.client, config)
        summary, solo_summary = summaries[0], (summaries[1] if solo else None)
        rollout_s = time.perf_counter() - t0
        order = [t.id for t in solo + tasks]
        actions, batches, missing, skipped, solo_stats = step_batches(self.store, summary, order, agents, config, solo_summary)
        metrics: dict[str, Any] = {
            **step_metrics(actions, summary),
            **solo_stats,
            "rollout_s": rollout_s,
            "skipped_no_reward": skipped["no_reward"],
            "skipped_after_termination": skipped["after_termination"],
        }
        for role, agent in agents.items():
            if role in batches:
                metrics.update(update_agent(agent, batches[role], config))
            else:
                metrics[f"{role}/skipped"] = missing[role][:200]
        return metrics


def step_batches(
    store: TraceStore, summary: RunSummary, order: list[str], agents: dict[str, Agent], config: MAGRPOConfig,
    solo: RunSummary | None = None,
) -> tuple[Any, ...]:
    """Joint actions, returns, per-agent batches (with the `solo` rollout's groups in the answering agent's) and
    solo metrics of one step (questions ranked as in `order`)."""
    episode_ids = [r.episode_id for r in summary.results]
    position = {task_id: i for i, task_id in enumerate(order)}
    results = [*summary.results, *(solo.results if solo else [])]
    episode_order = {r.episode_id: position[r.task_id] for r in results}
    calls = store.calls(episode_id=episode_ids, role=list(config.agents))
    rewards = store.rewards(episode_id=episode_ids)
    actions, skipped = joint_actions(
        calls,
        rewards,
        agents=config.agents,
        answer_role=config.answer_role,
        reward_weights=reward_weights(config),
        threshold=config.threshold,
        episode_order=episode_order,
    )
    if not actions:
        raise RuntimeError(
            f"the rollout produced no joint actions ({len(calls)} agent calls, skipped {skipped}); "
            f"check that `{config.answer_role}` calls record their parent calls and rewards"
        )
    joint_returns(actions, config.gamma)
    alone, solo_skipped = solo_actions(store, solo, config, episode_order) if solo else ([], {"no_reward": 0})
    skipped["no_reward"] += solo_skipped["no_reward"]
    batches, missing = agent_batches(
        [*actions, *alone],
        agents=config.agents,
        base_models={r: a.base_model for r, a in agents.items()},
        pad_token_ids={r: a.pad_token_id for r, a in agents.items()},
        std_scale=config.std_scale,
        max_len=config.max_len,
    )
    return actions, batches, missing, skipped, solo_metrics(store, solo, alone) if solo else {}


def update_agent(agent: Agent, batch: TrajectoryBatch, config: MAGRPOConfig) -> dict[str, Any]:
    """One MAGRPO gradient step of `agent` on its batch; its metrics, named `<role>/...`."""
    from .update import policy_update

    metrics = policy_update(
        agent.model,
        agent.optimizer,
        batch,
        loss="magrpo",
        micro_batch_size=config.micro_batch_size,
        max_grad_norm=config.max_grad_norm,
        tempered_policy=config.tempered_policy,
    )
    metrics = {**metrics, "rows": len(batch), "zero_advantage_groups": batch.stats.zero_advantage_groups,
               "dropped": batch.stats.dropped}  # fmt: skip
    return {f"{agent.role}/{k}": v for k, v in metrics.items()}


def step_metrics(actions: list[JointAction], summary: RunSummary) -> dict[str, Any]:
    """Rewards and tree sizes of a rollout for the log."""
    first = [a for a in actions if a.turn == 0]
    return {
        "reward/mean": sum(a.reward for a in first) / len(first),
        "return/mean": sum(a.value for a in first) / len(first),
        "reward/correct": summary.accuracy,
        "joint_actions": len(actions),
        "turns/max": 1 + max(a.turn for a in actions),
    }


# ------------------------------------------------------------------------------------------- training


def train(config: MAGRPOConfig) -> TrainResult:
    """Online MAGRPO as configured; returns every agent's final adapter, the evaluation and the history."""
    from mlpo_agents.config import load_team
    from mlpo_agents.models import ModelClient
    from mlpo_agents.trace import TraceStore

    team = load_team(config.team) if config.team else cooperate_team(config)
    config = for_team(config, team)
    for role in config.agents:
        team.role(role)  # misuse: a role the team does not have fails here, with the fix
    state = MAGRPOState()
    run = Run(config, state, save_every=config.save_every)
    store = TraceStore(config.traces or run.out / "traces.sqlite")
    client = ModelClient(team, store)
    agents = {role: Agent(role, agent_spec(team, role), config, i, client) for i, role in enumerate(config.agents)}
    run.resume({role: run.out / "agents" / role for role in agents}, agents)  # on resume, `state` is the checkpoint's
    alone = agents[config.answer_role]  # evaluated by itself beside the team: the single-agent baseline
    with shaping_rubric(config):
        result = run_training(
            run,
            JointSteps(agents, team, config, store, client, state),
            steps=config.steps,
            evaluate=lambda label: evaluate(team, client, config, label=label, alone=alone),
            max_minutes=config.max_minutes,
        )
    store.close()
    return result
