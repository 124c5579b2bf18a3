"""MLPO evaluation: held-out team and solo accuracy of the leader, before, during and after training.

`evaluate` runs the held-out questions twice with the leader's current adapter, with its team and solo
(peers=0), one leader sample each, and reports accuracy under the project's strict answer rule (what
trains), the lenient figure beside it and each question's strict outcome. The peers answer each
held-out question once per run (one evaluation peer pool, kept in the train state and checkpoints), so
every evaluation of a run shows the leader the same proposals and before/after are paired: they differ
only by the leader. `baseline_from` reuses a previous run's untrained ("before") evaluation and pool
(`BASELINE`, checked by `baseline_fingerprint` in `load_baseline`) instead of recomputing them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import load_split
from .mlpo_steps import leader_team, rollout
from .run import EVAL_STEP, step_seed

if TYPE_CHECKING:
    from mlpo_agents.config import TeamConfig


if TYPE_CHECKING:
    from .mlpo import MLPOConfig, MLPOState, Policy


def evaluate_run(policy: Policy, team: TeamConfig, config: MLPOConfig, state: MLPOState, label: str) -> dict[str, Any]:
    """The run's evaluation `label`; "before" is reused from `baseline_from` when given, and written to
    `BASELINE` with the evaluation pool either way."""
    if label != "before":
        return evaluate(policy, team, config, label=label, state=state)
    fingerprint = baseline_fingerprint(config, team)
    if config.baseline_from:
        before, state.eval_pool = load_baseline(config.baseline_from, fingerprint)
        print(f"reusing the untrained evaluation of {config.baseline_from}")
    else:
        before = evaluate(policy, team, config, label=label, state=state)
    saved = {"fingerprint": fingerprint, "before": before, "eval_pool": state.eval_pool}
    (Path(config.out) / BASELINE).write_text(json.dumps(saved))
    return before


def evaluate(policy: Policy, team: TeamConfig, config: MLPOConfig, *, label: str, state: MLPOState) -> dict[str, Any]:
    """Held-out accuracy of the leader (current adapter) with its team and solo (peers=0), leader_samples=1.

    Accuracy is the strict answer rule (what trains); `*_lenient_accuracy` is the lenient figure, and
    `*_correct` maps each task id to its strict outcome (for paired tests). The peers answer each
    held-out question once (an evaluation pool kept in `state.eval_pool`): every evaluation of a run
    shows the leader the same proposals, so before and after differ only by the leader.
    """
    from mlpo_agents.graphs import build_topology
    from mlpo_agents.graphs.pooled_peers import PeerPool
    from mlpo_agents.trace import TraceStore

    tasks = load_split(config, "test", config.eval_questions)
    store = TraceStore(Path(config.out) / "eval_traces.sqlite")
    pool = PeerPool.from_json(state.eval_pool) if state.eval_pool else PeerPool()
    out: dict[str, Any] = {"questions": len(tasks)}
    for name, peers in (("team", int(team.params.get("peers", 0))), ("solo", 0)):
        params = {**team.params, "peers": peers, "leader_samples": 1}
        eval_team = leader_team(
            team.model_copy(update={"params": params, "name": f"{team.name}-{name}-{label}"}),
            step_seed(config.seed, EVAL_STEP),
            config.eval_temperature,
        )
        if peers and team.topology == "leader_peers":
            graph = build_topology("mlpo_agents.graphs.pooled_peers:build_pooled_peers", **params, pool=pool)
        else:
            graph = build_topology(team.topology, **params)
        summary = rollout(policy, eval_team, tasks, store, graph, task_name=config.task)
        out[f"{name}_accuracy"] = summary.accuracy
        out[f"{name}_lenient_accuracy"] = summary.lenient_accuracy
        out[f"{name}_correct"] = {r.task_id: r.reward for r in summary.results if r.status != "failed"}
    state.eval_pool = pool.to_json()
    store.close()
    return out


BASELINE = "baseline.json"
"""Where a run keeps its untrained evaluation, the evaluation peer pool and what they depend on."""


def baseline_fingerprint(config: MLPOConfig, team: TeamConfig) -> dict[str, Any]:
    """Everything the untrained evaluation depends on. The leader's own sampling temperature is left out:
    evaluation replaces it with `eval_temperature`."""
    dumped = team.model_dump(mode="json", exclude={"name"})
    leader = dumped.get("roles", {}).get("leader", {})
    leader.get("sampling", {}).pop("temperature", None)
    fields = ("task", "task_options", "data_dir", "eval_questions", "seed", "eval_temperature")
    return {**{f: getattr(config, f) for f in fields}, "team": dumped}


def load_baseline(folder: str | Path, fingerprint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(before evaluation, evaluation pool) of the run in `folder`, checked against `fingerprint`.

    Reads `<folder>/baseline.json`; a run from before that file existed serves through its latest
    checkpoint and logged `config.json`.
    """
    from mlpo_agents.config import load_team

    from .loop import Checkpointer
    from .mlpo import MLPOConfig

    folder = Path(folder)
    if (folder / BASELINE).exists():
        saved = json.loads((folder / BASELINE).read_text())
        theirs, before, pool = saved["fingerprint"], saved["before"], saved["eval_pool"]
    else:
        checkpoint = Checkpointer(folder).latest()
        if checkpoint is None or not (folder / "config.json").exists():
            raise ValueError(
                f"baseline_from={folder}: no {BASELINE} and no checkpoint with config.json there; "
                "point it at the folder of an MLPO run that evaluated before training"
            )
        logged = json.loads((folder / "config.json").read_text())
        known = {f.name for f in dataclasses.fields(MLPOConfig)}
        theirs = baseline_fingerprint(
            MLPOConfig(**{k: v for k, v in logged.items() if k in known and k not in ("offline", "resume")}),
            load_team(logged["team"]),
        )
        before, pool = checkpoint.state["evaluation"]["before"], checkpoint.state["eval_pool"]
    differ = sorted(k for k in set(fingerprint) | set(theirs) if fingerprint.get(k) != theirs.get(k))
    if differ:
        raise ValueError(
            f"baseline_from={folder} was evaluated with other settings ({', '.join(differ)} differ); "
            "its untrained evaluation does not apply: drop baseline_from or match those settings"
        )
    return before, pool

