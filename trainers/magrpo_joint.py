"""MAGRPO's joint actions: chains of agent calls read from traces, their returns, and one batch per agent.

Pure functions of recorded calls and rewards (no model, no engine): `joint_actions` links each answer call
to the same-turn calls it builds on and applies CoMLRL's node-level early termination, `joint_returns`
discounts later turns' returns into each joint action's value, `agent_batches` regroups every agent's calls
by joint-action group with those returns as rewards. `JOINT_TOPOLOGIES`, `for_team` and `graph_params` say
how the shipped two-agent topologies produce joint actions; `reward_weights` what the joint reward weighs. The
trainer is `trainers.magrpo`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mlpo_agents.trace import ModelCall, Reward

from .batch import TraceMismatchError
from .losses import discounted_returns

if TYPE_CHECKING:
    from mlpo_agents.config import TeamConfig



if TYPE_CHECKING:
    from .magrpo import MAGRPOConfig

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


def reward_weights(config: MAGRPOConfig) -> dict[str, float]:
    """The joint reward's weights of the answer call's rewards: `correct`, plus `format_weight` x the
    `format_reward` shaping entry when it counts (stores recorded without one stay usable)."""
    return {"correct": 1.0, config.format_reward: config.format_weight} if config.format_weight else {"correct": 1.0}


# ------------------------------------------------------------------------------------------- topologies


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


def for_team(config: MAGRPOConfig, team: TeamConfig) -> MAGRPOConfig:
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


def graph_params(config: MAGRPOConfig, team: TeamConfig, *, evaluation: bool = False) -> dict[str, Any]:
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
