"""MAGRPO: train every agent of a cooperating team from one joint reward per joint action.

Liu et al. 2025, "LLM Collaboration with Multi-Agent Reinforcement Learning" (MAGRPO), arXiv 2508.04652;
reference implementation OpenMLRL/CoMLRL. N agents, each with its own policy, act on a shared task; at
each node of the rollout the team samples G joint actions, a joint reward R_g scores each, and every
agent i minimises loss_i = -(1/G) sum_g A_g * sum_t log pi_i(o_{i,g,t}) with A_g = R_g - mean_g R
(`losses.magrpo_loss`). Read top to bottom: `MAGRPOConfig` → joint actions from traces
(`joint_actions`, `joint_returns`, `agent_batches`, pure) → `Agent` → `train`.

Setting here: the `cooperate` topology (graphs/cooperate.py): a drafter writes a plan, a solver answers
from it, both trainable; or the paper's own code setting, the `code_pair` topology (graphs/code_pair.py):
a helper writes `aux`, the main agent the task's entry point, scored as one program by the unit tests
(`JOINT_TOPOLOGIES` says which roles and fan-out parameter each uses). One joint action is a chain of
calls of one turn linked by `parent_call_id` (draft → answer, aux → main); its reward is the last call's
call-level reward (correctness, plus `format_weight` x format; for `code_pair` that of the joint
program). Sibling joint actions (same context) are those whose first call shares the first agent's
group id. Each step: rollouts through `run_team` on the local engine serving the current adapters → traces
→ joint actions → one batch per agent → `trainers.update.policy_update(loss="magrpo")` per agent →
save + hot-load every adapter (`engine.load_adapter`, `client.use_version`) → repeat.

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
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlpo_agents.adapters import role_spec
from mlpo_agents.trace import ModelCall, Reward

from .batch import TraceMismatchError
from .common import (
    PolicyGradientConfig,
    TrainableLora,
    load_split,
    run_episodes,
)
from .losses import discounted_returns

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
        if not 0 < self.top_p <= 1 or self.max_grad_norm < 0:
            problems.append(f"top_p={self.top_p} must be in (0, 1] and max_grad_norm >= 0")
        if self.micro_batch_size < 1 or self.concurrency < 1:
            problems.append("micro_batch_size and concurrency must be >= 1")
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
class TrainResult:
    """What `train` returns."""

    out: Path
    adapters: dict[str, Path]
    """Each agent's final adapter folder (peft format)."""
    steps: int
    evaluation: dict[str, dict[str, float]]
    """{"before": {...}, "after": {...}}: team accuracy on held-out questions."""
    history: list[dict[str, Any]]
    wall_s: float

    def summary(self) -> dict[str, Any]:
        """A JSON-able digest (what `mlpo train` prints)."""
        return {
            "out": str(self.out),
            "adapters": {k: str(v) for k, v in self.adapters.items()},
            "steps": self.steps,
            "evaluation": self.evaluation,
            "wall_s": round(self.wall_s, 1),
        }


# ------------------------------------------------------------------------------------------- joint actions (pure)


@dataclass
class JointAction:
    """The calls of one joint action (one per agent, in order), its group, reward and return."""

    calls: list[ModelCall]
    """The agents' calls, first to last (e.g. [draft, answer]); in cross mode a draft is shared."""
    group: str
    """Sibling key: the first call's group id (the G joint actions sampled in one context)."""
    parent: str | None
    """The previous turn's joint action this one branched from (its last call id), None at turn 0."""
    reward: float
    """Joint reward: weighted call-level rewards of the last call."""
    done: bool
    """Its node terminated (mean reward above the threshold): no next turn branches from it."""
    value: float = 0.0
    """Discounted return (filled by `joint_returns`)."""

    @property
    def key(self) -> str:
        """The id of the joint action: its last call's id."""
        return self.calls[-1].call_id

    @property
    def turn(self) -> int:
        """The turn (round) it was taken at."""
        return self.calls[-1].round


def joint_actions(
    calls: Sequence[ModelCall],
    rewards: Sequence[Reward],
    *,
    agents: Sequence[str],
    answer_role: str,
    reward_weights: Mapping[str, float],
    threshold: float | None = None,
    episode_order: Mapping[str, int] | None = None,
) -> tuple[list[JointAction], dict[str, int]]:
    """Joint actions of recorded episodes: each `answer_role` call and the same-turn agent calls it builds on.

    Early termination as CoMLRL: a node (the joint actions sharing a group) whose mean reward exceeds
    `threshold` is `done`, and the joint actions that branched from it (and their subtrees) are left out.
    Returns the joint actions and counts of answers left out (`no_reward`: a named reward is missing;
    `after_termination`: below a terminated node).
    The chain is followed through `parent_call_id` while the parent is an agent call of the same
    round. The order is deterministic whatever order concurrent episodes were recorded in: by
    `episode_order` rank (default: first appearance), then by the sample indices along the path
    from the root of the episode's tree.
    """
    by_id = {c.call_id: c for c in calls}
    table = {(r.call_id, r.name): float(r.value) for r in rewards if r.call_id is not None}
    out: list[JointAction] = []
    skipped = {"no_reward": 0, "after_termination": 0}
    for head in (c for c in calls if c.role == answer_role):
        if any((head.call_id, name) not in table for name in reward_weights):
            skipped["no_reward"] += 1
            continue
        chain = [head]
        parent = by_id.get(head.parent_call_id or "")
        while parent is not None and parent.role in agents and parent.round == head.round:
            chain.insert(0, parent)
            parent = by_id.get(parent.parent_call_id or "")
        reward = sum(w * table[(head.call_id, name)] for name, w in reward_weights.items())
        out.append(
            JointAction(
                chain, chain[0].group_id, parent.call_id if parent is not None else None, reward, False
            )
        )
    out = _terminate_nodes(out, threshold, skipped)
    rank = dict(episode_order) if episode_order is not None else {}
    for c in calls:
        rank.setdefault(c.episode_id, len(rank))

    def path(call: ModelCall | None) -> tuple[int, ...]:
        indices: list[int] = []
        while call is not None:
            indices.append(call.sample_index)
            call = by_id.get(call.parent_call_id or "")
        return tuple(reversed(indices))

    out.sort(key=lambda a: (rank[a.calls[-1].episode_id], path(a.calls[-1])))
    return out, skipped


def _terminate_nodes(
    actions: list[JointAction], threshold: float | None, skipped: dict[str, int]
) -> list[JointAction]:
    """Mark the joint actions of nodes whose mean reward exceeds `threshold` done; drop what branched from them."""
    if threshold is None:
        return actions
    nodes: dict[str, list[JointAction]] = {}
    for a in actions:
        nodes.setdefault(a.group, []).append(a)
    for members in nodes.values():
        if sum(a.reward for a in members) / len(members) > threshold:
            for a in members:
                a.done = True
    ended = {a.key for a in actions if a.done}
    kept: list[JointAction] = []
    for a in sorted(actions, key=lambda a: a.turn):  # parents before children
        if a.parent is not None and a.parent in ended:
            ended.add(a.key)  # its subtree goes too
            skipped["after_termination"] += 1
        else:
            kept.append(a)
    keep = {a.key for a in kept}
    return [a for a in actions if a.key in keep]


def joint_returns(actions: Sequence[JointAction], gamma: float = 0.9) -> torch.Tensor:  # (J,)
    """Fill and return each joint action's return: R = r + gamma * (1 - done) * mean(children's R).

    Turns are processed last to first; each turn's nodes form one `discounted_returns` call over two
    steps, [own reward, mean return of the children], with the done mask cutting the bootstrap.
    """
    children: dict[str, list[JointAction]] = {}
    for a in actions:
        if a.parent is not None:
            children.setdefault(a.parent, []).append(a)
    for turn in sorted({a.turn for a in actions}, reverse=True):
        nodes = [a for a in actions if a.turn == turn]
        after = [
            sum(c.value for c in kids) / len(kids) if (kids := children.get(a.key)) else 0.0 for a in nodes
        ]
        rewards = torch.tensor([[a.reward, v] for a, v in zip(nodes, after, strict=True)])  # (N, 2)
        done = torch.tensor([[a.done, True] for a in nodes])  # (N, 2)
        values = discounted_returns(rewards, gamma, done)[:, 0]  # (N,)
        for a, v in zip(nodes, values.tolist(), strict=True):
            a.value = v
    return torch.tensor([a.value for a in actions])


def agent_batches(
    actions: Sequence[JointAction],
    *,
    agents: Sequence[str],
    base_models: Mapping[str, str],
    pad_token_ids: Mapping[str, int] | None = None,
    std_scale: bool = False,
    max_len: int | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """One `TrajectoryBatch` per agent: its calls regrouped by joint-action group, rewarded with the returns.

    A call's reward is the mean return of the joint actions it is part of (one in aligned mode), so
    `traces_to_batch`'s advantage, reward minus the group mean over the agent's rows, is the joint
    advantage A_g = R_g - mean(R). Returns (batches, missing): an agent with no usable group (every
    group has a single usable joint action) is in `missing` with the reason instead of `batches`.
    """
    from .batch import traces_to_batch

    values: dict[str, list[float]] = {}
    for a in actions:
        for call in a.calls:
            values.setdefault(call.call_id, []).append(a.value)
    batches, missing = {}, {}
    for role in agents:
        rows: list[ModelCall] = []
        seen: set[str] = set()
        counts: dict[str, int] = {}
        for a in actions:
            for call in a.calls:
                if call.role != role or call.call_id in seen:
                    continue  # in cross mode a draft is part of several joint actions: one row
                seen.add(call.call_id)
                index = counts[a.group] = counts.get(a.group, -1) + 1
                rows.append(dataclasses.replace(call, group_id=a.group, sample_index=index))
        if not rows:
            missing[role] = "no calls in any joint action"
            continue
        returns = [
            Reward(
                c.episode_id,
                "joint_return",
                sum(values[c.call_id]) / len(values[c.call_id]),
                call_id=c.call_id,
            )
            for c in rows
        ]
        try:
            batches[role] = traces_to_batch(
                rows,
                returns,
                roles=(role,),
                base_model=base_models[role],
                reward_names=("joint_return",),
                pad_token_id=(pad_token_ids or {}).get(role, 0),
                std_scale=std_scale,
                max_len=max_len,
            )
        except ValueError as e:  # every group degenerate (e.g. all but one answer failed): skip, say why
            if isinstance(e, TraceMismatchError):
                raise
            missing[role] = str(e)
    return batches, missing


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


@dataclass(frozen=True)
class JointTopology:
    """How MAGRPO drives a shipped two-agent topology."""

    agents: tuple[str, str]
    """The default trainable roles, first to last; the last one's call ends a joint action."""
    fan_out: str
    """The builder parameter giving the last agent's samples per first-agent sample (1 aligned, G cross)."""
    multi_turn: bool
    """The builder takes `turns` and `threshold`; otherwise it is single-turn (`turns` must be 1)."""


JOINT_TOPOLOGIES = {
    "cooperate": JointTopology(("drafter", "solver"), "solver_samples", True),
    "code_pair": JointTopology(("helper", "main"), "main_samples", False),
}
"""Shipped topologies MAGRPO sets the joint-action parameters of; a user topology brings its own."""


def for_team(config: MAGRPOConfig, team: Any) -> MAGRPOConfig:
    """`config` for `team`: the agents of its topology when `agents` and `answer_role` were left at their
    defaults (the `cooperate` pair), and `turns` checked against a single-turn topology."""
    spec = JOINT_TOPOLOGIES.get(team.topology)
    if spec is None:
        return config
    if not spec.multi_turn and config.turns != 1:
        raise ValueError(f"turns={config.turns}: the {team.topology} topology has one turn; use turns=1")
    default = JOINT_TOPOLOGIES["cooperate"].agents
    if (config.agents, config.answer_role) == (default, default[-1]) and spec.agents != default:
        return dataclasses.replace(config, agents=spec.agents, answer_role=spec.agents[-1])
    return config


def graph_params(config: MAGRPOConfig, team: Any, *, evaluation: bool = False) -> dict[str, Any]:
    """Topology parameters of the training rollouts: G first-agent samples, aligned or cross answers, turns,
    threshold; with `evaluation`, one joint action of one turn."""
    spec = JOINT_TOPOLOGIES.get(team.topology)
    if spec is None:  # a user topology brings its own sampling fan-out and parent links
        return (
            {**team.params, "samples": 1, "solver_samples": 1, "turns": 1}
            if evaluation
            else dict(team.params)
        )
    group = 1 if evaluation else config.group_size
    params = {**team.params, "samples": group, spec.fan_out: group if config.joint_mode == "cross" else 1}
    if spec.multi_turn:
        # Every joint action branches; `joint_actions` applies the node-level termination (CoMLRL's rule).
        params.update(turns=1 if evaluation else config.turns, threshold=math.inf)
    return params


def seeded_team(team: Any, roles: Sequence[str], seed: int, temperature: float | None = None) -> Any:
    """A copy of `team` whose agent roles sample with their own fixed seed (optionally another temperature)."""
    copies = {name: rc.model_copy(deep=True) for name, rc in team.roles.items()}
    for i, role in enumerate(roles):
        copies[role].sampling.seed = (seed + 7919 * i) % (1 << 31)
        if temperature is not None:
            copies[role].sampling.temperature = temperature
    return team.model_copy(update={"roles": copies})


def step_seed(seed: int, step: int) -> int:
    """A per-step sampling seed derived from the run seed (reproducible, different each step)."""
    return random.Random(f"magrpo/{seed}/{step}").getrandbits(31)


class Agent(TrainableLora):
    """One trainable agent: a LoRA copy of its base model, its optimizer, and the engine serving it."""

    def __init__(self, role: str, spec: str, config: MAGRPOConfig, index: int):
        super().__init__(spec, config, seed=config.seed + 1000 * index)  # LoRA init, different per agent
        self.role = role
        self.pad_token_id = self.tokenizer.pad_token_id or 0

    def publish(self, client: Any, folder: Path, step: int) -> None:
        """Hot-load the adapter in `folder` into the engine and route this agent's calls to it."""
        self.serve(client, self.role, f"{self.role}-step-{step}", folder)


def agent_spec(team: Any, role: str) -> str:
    """The local engine spec serving `role`; other deployments cannot be hot-loaded with new adapters."""
    return role_spec(team, role, "serve every trained agent with `local/<spec>`")


# ------------------------------------------------------------------------------------------- one step


def rollout(team: Any, tasks: list[Any], store: Any, graph: Any, client: Any, config: MAGRPOConfig) -> Any:
    """Run the team on `tasks` with every agent's current adapter; returns the runner's RunSummary."""
    return run_episodes(
        client,
        team,
        tasks,
        store,
        task_name=config.task,
        concurrency=config.concurrency,
        progress=False,
        graph=graph,
        score_roles=config.agents,
    )


def step_batches(
    store: Any, summary: Any, order: list[str], agents: dict[str, Agent], config: MAGRPOConfig
) -> tuple[Any, ...]:
    """Joint actions, returns and per-agent batches of one rollout (questions ranked as in `order`)."""
    episode_ids = [r.episode_id for r in summary.results]
    position = {task_id: i for i, task_id in enumerate(order)}
    episode_order = {r.episode_id: position[r.task_id] for r in summary.results}
    calls = store.calls(episode_id=episode_ids, role=list(config.agents))
    rewards = store.rewards(episode_id=episode_ids)
    actions, skipped = joint_actions(
        calls,
        rewards,
        agents=config.agents,
        answer_role=config.answer_role,
        reward_weights={"correct": 1.0, "format": config.format_weight}
        if config.format_weight
        else {"correct": 1.0},
        threshold=config.threshold,
        episode_order=episode_order,
    )
    if not actions:
        raise RuntimeError(
            f"the rollout produced no joint actions ({len(calls)} agent calls, skipped {skipped}); "
            f"check that `{config.answer_role}` calls record their parent calls and rewards"
        )
    joint_returns(actions, config.gamma)
    batches, missing = agent_batches(
        actions,
        agents=config.agents,
        base_models={r: a.base_model for r, a in agents.items()},
        pad_token_ids={r: a.pad_token_id for r, a in agents.items()},
        std_scale=config.std_scale,
        max_len=config.max_len,
    )
    return actions, batches, missing, skipped


def step_metrics(actions: list[JointAction], summary: Any) -> dict[str, Any]:
    """Rewards and tree sizes of a rollout for the log."""
    first = [a for a in actions if a.turn == 0]
    return {
        "reward/mean": sum(a.reward for a in first) / len(first),
        "return/mean": sum(a.value for a in first) / len(first),
        "reward/correct": summary.accuracy,
        "joint_actions": len(actions),
        "turns/max": 1 + max(a.turn for a in actions),
    }


# ------------------------------------------------------------------------------------------- evaluation


def evaluate(team: Any, client: Any, config: MAGRPOConfig, *, label: str) -> dict[str, float]:
    """Held-out team accuracy with the current adapters: one turn, one draft, one answer."""
    from mlpo_agents.graphs import build_topology
    from mlpo_agents.trace import TraceStore

    tasks = load_split(config, "test", config.eval_questions)
    params = graph_params(config, team, evaluation=True)
    eval_team = seeded_team(
        team.model_copy(update={"name": f"{team.name}-{label}", "params": params}),
        config.agents,
        step_seed(config.seed, -1),
        config.eval_temperature,
    )
    store = TraceStore(Path(config.out) / "eval_traces.sqlite")
    try:
        summary = rollout(eval_team, tasks, store, build_topology(team.topology, **params), client, config)
    finally:
        store.close()
    return {"team_accuracy": summary.accuracy}


# ------------------------------------------------------------------------------------------- training


def train(config: MAGRPOConfig) -> TrainResult:
    """Online MAGRPO as configured; returns every agent's final adapter, the evaluation and the history."""
    from mlpo_agents.config import load_team
    from mlpo_agents.graphs import build_topology
    from mlpo_agents.models import ModelClient
    from mlpo_agents.trace import TraceStore

    from .loop import Checkpointer, TrainLogger, progress, set_rng_state
    from .lora import save_adapter
    from .update import policy_update

    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    team = load_team(config.team) if config.team else cooperate_team(config)
    config = for_team(config, team)
    for role in config.agents:
        team.role(role)  # misuse: a role the team does not have fails here, with the fix
    agents = {role: Agent(role, agent_spec(team, role), config, i) for i, role in enumerate(config.agents)}
    store = TraceStore(config.traces or out / "traces.sqlite")
    client = ModelClient(team, store)
    logger = TrainLogger(out, dataclasses.asdict(config), resume=config.resume)
    checkpointers = {role: Checkpointer(out / "agents" / role, config.save_every) for role in agents}
    state: dict[str, Any] = {"cursor": 0, "evaluation": {}}
    first_step = 0

    if config.resume:
        steps_by_agent = [{int(p.name.split("-")[1]) for p in c.complete()} for c in checkpointers.values()]
        common = set.intersection(*steps_by_agent) if steps_by_agent else set()
        if common:  # the newest step every agent finished saving (a crash may leave one agent ahead)
            first_step = max(common)
            for role, agent in agents.items():
                checkpoint = checkpointers[role].load(checkpointers[role].root / f"step-{first_step:06d}")
                agent.restore(checkpoint.adapter)
                agent.optimizer.load_state_dict(checkpoint.optimizer_state())
                agent.publish(client, checkpoint.adapter, first_step)
            set_rng_state(checkpoint.rng())
            state = checkpoint.state
            logger.truncate(first_step)
        else:
            print(
                f"no step with a complete checkpoint of every agent under {out / 'agents'}: starting from step 0"
            )

    if first_step == 0 and config.eval_questions:
        state["evaluation"]["before"] = evaluate(team, client, config, label="before")
        logger.log(0, {f"eval/{k}": v for k, v in state["evaluation"]["before"].items()})

    questions = load_split(config, "train", config.train_questions)
    random.Random(config.seed).shuffle(questions)
    params = graph_params(config, team)
    graph = build_topology(team.topology, **params)
    adapters: dict[str, Path] = {}
    bar = progress(config.steps, first_step, config.progress)
    step = first_step
    for step in range(first_step + 1, config.steps + 1):
        tasks = [questions[(state["cursor"] + i) % len(questions)] for i in range(config.questions_per_step)]
        state["cursor"] += config.questions_per_step
        t0 = time.perf_counter()
        step_team = seeded_team(
            team.model_copy(update={"params": params}), config.agents, step_seed(config.seed, step)
        )
        summary = rollout(step_team, tasks, store, graph, client, config)
        rollout_s = time.perf_counter() - t0
        actions, batches, missing, skipped = step_batches(
            store, summary, [t.id for t in tasks], agents, config
        )
        metrics: dict[str, Any] = {
            **step_metrics(actions, summary),
            "rollout_s": rollout_s,
            "skipped_no_reward": skipped["no_reward"],
            "skipped_after_termination": skipped["after_termination"],
        }
        for role, agent in agents.items():
            if role in batches:
                batch = batches[role]
                update = policy_update(
                    agent.model,
                    agent.optimizer,
                    batch,
                    loss="magrpo",
                    micro_batch_size=config.micro_batch_size,
                    max_grad_norm=config.max_grad_norm,
                    tempered_policy=config.tempered_policy,
                )
                metrics.update({f"{role}/{k}": v for k, v in update.items()})
                metrics.update(
                    {
                        f"{role}/rows": len(batch),
                        f"{role}/zero_advantage_groups": batch.stats.zero_advantage_groups,
                        f"{role}/dropped": batch.stats.dropped,
                    }
                )
            else:
                metrics[f"{role}/skipped"] = missing[role][:200]
            adapters[role] = save_adapter(
                agent.model,
                out / "adapters" / role / f"step-{step}",
                base_model=agent.base_model,
                meta={"step": step},
            )
            agent.publish(client, adapters[role], step)
        logger.log(step, metrics)
        out_of_time = config.max_minutes is not None and time.perf_counter() - start > 60 * config.max_minutes
        last = step == config.steps or out_of_time
        for role, agent in agents.items():
            if checkpointers[role].due(step, last=last):
                checkpointers[role].save(
                    step,
                    model=agent.model,
                    optimizer=agent.optimizer,
                    state=state,
                    base_model=agent.base_model,
                )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}")
        if out_of_time:
            print(f"stopping after step {step}: max_minutes={config.max_minutes} reached")
            break
    if bar is not None:
        bar.close()

    if config.eval_questions:
        state["evaluation"]["after"] = evaluate(team, client, config, label="after")
        logger.log(step, {f"eval/{k}": v for k, v in state["evaluation"]["after"].items()})
    logger.close()
    store.close()
    for role in agents:
        adapters.setdefault(role, out / "adapters" / role / f"step-{step}")
    return TrainResult(out, adapters, step, state["evaluation"], logger.history, time.perf_counter() - start)
