"""MAGRPO's solo groups (`MAGRPOConfig.solo_fraction`, not in the paper): the answering agent asked some of each
step's questions by itself, G samples per question, and trained on them in the same update as its joint actions.

Why: trained on joint actions only, the answering agent only ever answers from a draft and loses its own skill
(cooperate team, SmolLM2-135M, word_problems: the team's held-out accuracy rose 0.025 -> 0.155 while the solver's
alone fell 0.175 -> 0.020), so the trained team merely matched the untrained single agent. MLPO's `solo_fraction`
keeps its leader's solo skill the same way (`mlpo_steps.OnlineSteps`).

How: the agent is asked as `magrpo_eval` evaluates it alone (`alone_team`: `leader_peers` with no peers, the
role's model and sampling, its current adapter), with `leader_samples` = G at its training temperature and a
per-step seed; the solo rollout runs beside the team's (`common.run_episodes_together`). Each solo call is a
one-call joint action of the answering agent whose return is its reward (the joint reward's weights,
`magrpo_joint.reward_weights`), and the G calls of a question are one group, so `agent_batches` gives them
A = R - mean R (divided by the std with `std_scale`) in the answering agent's batch; no other agent gets rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .magrpo_eval import alone_team
from .magrpo_joint import JointAction, joint_actions, reward_weights
from .mlpo_steps import solve_rates
from .run import seeded_team

if TYPE_CHECKING:
    from mlpo_agents.config import TeamConfig
    from mlpo_agents.runner import RunSummary
    from mlpo_agents.trace import TraceStore

    from .common import TrainableLora
    from .magrpo import MAGRPOConfig

SOLO_AGENT = "leader"
"""The answering agent's id in its alone team (the `solo` team's leader)."""


def solo_count(config: MAGRPOConfig) -> int:
    """Questions of a step asked to the answering agent alone; at least one is left to the team."""
    return min(round(config.questions_per_step * config.solo_fraction), config.questions_per_step - 1)


class SoloGroups:
    """The answering agent by itself with G samples per question: its team and graph, served its current adapter."""

    def __init__(self, team: TeamConfig, config: MAGRPOConfig):
        from mlpo_agents.graphs import build_topology

        if SOLO_AGENT in team.roles and config.answer_role != SOLO_AGENT:
            raise ValueError(
                f"solo_fraction asks {config.answer_role!r} alone as {SOLO_AGENT!r}, a role team {team.name!r} "
                f"already has (its calls would be routed to the {config.answer_role} adapter); rename that role "
                "or set solo_fraction=0"
            )
        alone = alone_team(team, config.answer_role, f"{team.name}-{config.answer_role}-alone")
        self.team = alone.model_copy(update={"params": {**alone.params, "leader_samples": config.group_size}})
        self.graph = build_topology(self.team.topology, **self.team.params)

    def seeded(self, agent: TrainableLora, seed: int) -> TeamConfig:
        """The alone team of one step: sampling with `seed`, its leader routed to `agent`'s served adapter."""
        from mlpo_agents.adapters import hot_load

        team = seeded_team(self.team, seed, roles=[SOLO_AGENT])
        if agent.folder is not None:  # else the role's own deployment serves it: the base model
            hot_load(agent.client.with_team(team), SOLO_AGENT, agent.folder, agent.version)
        return team


def solo_actions(
    store: TraceStore, summary: RunSummary, config: MAGRPOConfig, episode_order: Mapping[str, int]
) -> tuple[list[JointAction], dict[str, int]]:
    """The solo calls of a rollout as one-call joint actions of the answering agent, their return their reward;
    and the counts of calls left out (`joint_actions`)."""
    episode_ids = [r.episode_id for r in summary.results]
    # Relabelled (in memory only) as the answering agent's calls, so that its batch takes them.
    calls = [
        dataclasses.replace(c, role=config.answer_role)
        for c in store.calls(episode_id=episode_ids, role=SOLO_AGENT)
    ]
    actions, skipped = joint_actions(
        calls,
        store.rewards(episode_id=episode_ids),
        agents=(config.answer_role,),
        answer_role=config.answer_role,
        reward_weights=reward_weights(config),
        episode_order=episode_order,
    )
    for a in actions:
        a.value = a.reward  # one turn, nothing after it: the return is the reward
    return actions, skipped


def solo_metrics(store: TraceStore, summary: RunSummary, actions: list[JointAction]) -> dict[str, Any]:
    """`reward/correct_solo` (the solo samples' strict accuracy, as MLPO logs it) and `reward/mean_solo` (their
    mean reward, the one their advantages come from)."""
    rates = solve_rates(store, summary, role=SOLO_AGENT)
    return {
        "reward/correct_solo": sum(rates.values()) / max(len(rates), 1),
        "reward/mean_solo": sum(a.reward for a in actions) / max(len(actions), 1),
    }
