"""MAGRPO evaluation: held-out accuracy of the cooperating team and of its answering agent alone.

`evaluate` runs the held-out questions with every agent's current adapter, greedy by default
(`eval_temperature`), and scores them under the project's strict answer rule (what trains):
- `team_*`: the team for one turn, one joint action per question (one draft, one answer; the paper's
  joint pass rate). Before training this is the prompted two-agent baseline.
- `solo_*`: the answering agent (`answer_role`, the solver) alone, with its current adapter, asked the
  question as the `solo` team's leader is (`leader_peers` with no peers): the single-agent baseline the
  paper compares with (before training: its base model alone).

Each gives `*_accuracy`, the lenient figure beside it (`*_lenient_accuracy`, None where the topology
gives no lenient answer) and each question's strict outcome (`*_correct`: task id -> reward), so two
evaluations of a run pair per question (`mlpo_agents.report.paired_row`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import load_split, run_episodes
from .magrpo_joint import graph_params
from .run import EVAL_STEP, seeded_team, step_seed

if TYPE_CHECKING:
    from mlpo_agents.config import TeamConfig
    from mlpo_agents.models import ModelClient
    from mlpo_agents.runner import RunSummary

    from .common import TrainableLora
    from .magrpo import MAGRPOConfig


def evaluate(
    team: TeamConfig, client: ModelClient, config: MAGRPOConfig, *, label: str, alone: TrainableLora | None = None
) -> dict[str, Any]:
    """Held-out strict accuracy and per-question outcomes of the team (one turn, one draft, one answer) and,
    when `alone` (the answering agent) is given, of that agent by itself, each with its current adapter."""
    from mlpo_agents.graphs import build_topology
    from mlpo_agents.trace import TraceStore

    tasks = load_split(config, "test", config.eval_questions)
    params = graph_params(config, team, evaluation=True)
    seed = step_seed(config.seed, EVAL_STEP)
    temperatures = dict.fromkeys(config.agents, config.eval_temperature)
    eval_team = seeded_team(
        team.model_copy(update={"name": f"{team.name}-{label}", "params": params}),
        seed,
        roles=config.agents,
        temperatures=temperatures,
    )
    store = TraceStore(Path(config.out) / "eval_traces.sqlite")
    out: dict[str, Any] = {"questions": len(tasks)}
    try:
        summary = run_episodes(
            client, eval_team, tasks, store, task_name=config.task, concurrency=config.concurrency,
            progress=False, graph=build_topology(team.topology, **params), score_roles=config.agents,
        )  # fmt: skip
        out.update(outcomes("team", summary))
        if alone is not None:
            out.update(outcomes("solo", evaluate_alone(alone, team, tasks, store, config, label=label, seed=seed)))
    finally:
        store.close()
    return out


def outcomes(name: str, summary: RunSummary) -> dict[str, Any]:
    """`<name>_accuracy`, `<name>_lenient_accuracy` and `<name>_correct` (task id -> strict reward) of a run."""
    return {
        f"{name}_accuracy": summary.accuracy,
        f"{name}_lenient_accuracy": summary.lenient_accuracy,
        f"{name}_correct": {r.task_id: r.reward for r in summary.results if r.status != "failed"},
    }


def alone_team(team: TeamConfig, role: str, name: str) -> TeamConfig:
    """`role` of `team` by itself, as the `solo` team's leader: `leader_peers` with no peers, the role's
    model and sampling."""
    leader = team.role(role).model_copy(deep=True)
    return team.model_copy(
        update={"name": name, "topology": "leader_peers", "params": {"peers": 0, "rounds": 1}, "roles": {"leader": leader}}
    )


def evaluate_alone(
    agent: TrainableLora, team: TeamConfig, tasks: list[Any], store: Any, config: MAGRPOConfig, *, label: str, seed: int
) -> RunSummary:
    """The agent answering `tasks` by itself with its current adapter (its own client: the team's routing is
    left as it is)."""
    from mlpo_agents.adapters import hot_load
    from mlpo_agents.graphs import build_topology
    from mlpo_agents.models import ModelClient

    solo = alone_team(team, agent.role, f"{team.name}-{agent.role}-alone-{label}")
    solo = seeded_team(solo, seed, roles=["leader"], temperatures={"leader": config.eval_temperature})
    client = ModelClient(solo, store)
    if agent.folder is not None:
        hot_load(client, "leader", agent.folder, agent.version)  # the same adapter, under the same name
    try:
        return run_episodes(
            client, solo, tasks, store, task_name=config.task, concurrency=config.concurrency, progress=False,
            graph=build_topology(solo.topology, **solo.params),
        )  # fmt: skip
    finally:
        client.close()
