"""What one MLPO step does: the team's rollouts, the easy-question filter, the GRPO update of the leader.

- `OnlineSteps`: each step draws its questions (the paper's pool filter drops easy ones first), runs the
  team with G leader samples per question (and solo groups with `solo_fraction`), turns the leader's calls
  into one batch and makes the update. `offline_steps`: the same update over a recorded store's groups.
- `update`, `batch_options`, `batch_metrics`: the GRPO step on a batch, shared by both.
- `warm_up`: the optional SFT warm-up on correct leader completions (TRL, `trl_glue`).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import load_split, run_episodes, run_episodes_together
from .run import seeded_team, step_seed

if TYPE_CHECKING:
    from mlpo_agents.config import TeamConfig
    from mlpo_agents.runner import RunSummary
    from mlpo_agents.tasks.base import Task
    from mlpo_agents.trace import TraceStore

    from .batch import TrajectoryBatch


if TYPE_CHECKING:
    from .mlpo import MLPOConfig, MLPOState, Policy


def leader_team(team: TeamConfig, seed: int, temperature: float | None) -> Any:
    """`team` with the leader and every peer sampling with its own seed (`run.seeded_team`), the leader at
    `temperature` (None: the team file's)."""
    peers = [f"peer-{k}" for k in range(1, int(team.params.get("peers", 0)) + 1)]
    return seeded_team(team, seed, roles=["leader", *peers], temperatures={"leader": temperature})


def rollout(
    policy: Policy, team: TeamConfig, tasks: list[Task], store: TraceStore, graph: Any, *, task_name: str, **options: Any
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


# ------------------------------------------------------------------------------------------- online


class OnlineSteps:
    """`step(n) -> metrics` of online MLPO: sample the step's questions with the team and update the leader.
    Reads and advances the run state's question cursor, easy set and peer pool."""

    def __init__(self, policy: Policy, team: TeamConfig, config: MLPOConfig, store: TraceStore, state: MLPOState):
        from mlpo_agents.graphs import build_topology
        from mlpo_agents.graphs.pooled_peers import PeerPool

        self.policy, self.team, self.config, self.store, self.state = policy, team, config, store, state
        self.questions = load_split(config, "train", config.train_questions)
        random.Random(config.seed).shuffle(self.questions)
        peers = int(team.params.get("peers", 0))
        params = {**team.params, "leader_samples": config.group_size}
        self.pool = PeerPool.from_json(state.pool) if state.pool else PeerPool()
        self.easy = set(state.easy)
        self.max_tokens = team.role("leader").sampling.max_tokens
        pooled = "mlpo_agents.graphs.pooled_peers:build_pooled_peers"
        if config.peer_pool and peers > 0 and team.topology == "leader_peers":
            self.graph = build_topology(pooled, **params, pool=self.pool, pool_samples=config.pool_samples)
        else:
            self.graph = build_topology(team.topology, **params)
        prefilter = config.easy_threshold is not None and config.easy_filter == "pool" and peers > 0
        fill = "mlpo_agents.graphs.pooled_peers:build_peer_fill"
        self.fill = (
            build_topology(fill, peers=peers, pool=self.pool, pool_samples=config.pool_samples) if prefilter else None
        )
        self.solo_count = min(round(config.questions_per_step * config.solo_fraction), config.questions_per_step - 1)
        if self.solo_count and team.topology != "leader_peers":
            raise ValueError(
                f"solo_fraction needs the leader_peers topology (peers=0 is the leader alone), not {team.topology!r}"
            )
        self.solo_graph = build_topology(team.topology, **{**params, "peers": 0}) if self.solo_count else None

    def __call__(self, n: int) -> dict[str, Any]:
        config, store, pool = self.config, self.store, self.pool
        t0 = time.perf_counter()
        tasks = self.next_questions(n)  # new questions' peers answer first (the pool, the easy filter)
        fill_s = time.perf_counter() - t0
        solo, tasks = tasks[: self.solo_count], tasks[self.solo_count :]
        pool.pick = n  # each reuse shows another pooled peer sample when pool_samples > 1
        hits = pool.hits
        seeded = leader_team(self.team, step_seed(config.seed, n), config.leader_temperature)
        summary, solo_summary = run_episodes_together(
            self.policy.client, [(seeded, tasks, self.graph), (seeded, solo, self.solo_graph)], store,
            task_name=config.task, concurrency=config.concurrency,
        )  # fmt: skip
        solo_summary = solo_summary if solo else None
        rollout_s = time.perf_counter() - t0
        batch = episode_batch(store, merged(summary, solo_summary), [t.id for t in solo + tasks], self.policy)
        rates = solve_rates(store, summary)
        if config.easy_threshold is not None and config.easy_filter == "leader":
            self.easy.update(task_id for task_id, rate in rates.items() if rate >= config.easy_threshold)
        self.state.easy, self.state.pool = sorted(self.easy), pool.to_json()
        metrics = {
            **update(self.policy, batch, self.max_tokens),
            **batch_metrics(batch),
            "reward/correct": sum(rates.values()) / max(len(rates), 1),
        }
        if solo_summary is not None:
            solo_rates = solve_rates(store, solo_summary)
            metrics["reward/correct_solo"] = sum(solo_rates.values()) / max(len(solo_rates), 1)
        return {
            **metrics,
            "rollout_s": rollout_s,  # pool fill included
            "pool_fill_s": fill_s,
            "team_accuracy_train": summary.accuracy,
            "easy_questions": len(self.easy),
            "pool/hits": pool.hits - hits,
        }

    def next_questions(self, n: int) -> list[Any]:
        """The step's questions from the cursor on, easy ones skipped (and, with the pool filter, screened)."""
        config, questions, scanned = self.config, self.questions, 0
        chosen: list[Any] = []
        while len(chosen) < config.questions_per_step and scanned < len(questions):
            candidates: list[Any] = []
            while len(chosen) + len(candidates) < config.questions_per_step and scanned < len(questions):
                task = questions[self.state.cursor % len(questions)]
                self.state.cursor += 1
                scanned += 1
                if task.id not in self.easy:
                    candidates.append(task)
            chosen += self.screen(candidates, n) if self.fill is not None else candidates
        if not chosen:
            raise RuntimeError(
                f"every train question is solved >= {config.easy_threshold} of the time; "
                "use harder questions or raise easy_threshold"
            )
        return chosen

    def screen(self, candidates: list[Any], n: int) -> list[Any]:
        """The paper's filter: pool the peers' answers of questions not yet pooled, drop the easy ones."""
        config = self.config
        fresh = [t for t in candidates if t.id not in self.pool]
        if fresh:
            seeded = leader_team(self.team, step_seed(config.seed, n, "pool"), None)
            summary = rollout(
                self.policy, seeded, fresh, self.store, self.fill, task_name=config.task, score_roles=("peer",)
            )
            rates = solve_rates(self.store, summary, role="peer")
            self.easy.update(task_id for task_id, rate in rates.items() if rate >= config.easy_threshold)  # type: ignore[operator]
        return [t for t in candidates if t.id not in self.easy]


def merged(summary: RunSummary, other: RunSummary | None) -> Any:
    """The episode results of two rollouts, as one summary-like object for `episode_batch`."""
    from types import SimpleNamespace

    return summary if other is None else SimpleNamespace(results=[*other.results, *summary.results])


def solve_rates(store: TraceStore, summary: RunSummary, role: str = "leader") -> dict[str, float]:
    """Per question of a rollout: the fraction of its `role` samples that were correct."""
    task_of = {r.episode_id: r.task_id for r in summary.results}
    leader = {c.call_id for c in store.calls(episode_id=list(task_of), role=role)}
    values: dict[str, list[float]] = {}
    for r in store.rewards(episode_id=list(task_of), name="correct"):
        if r.call_id in leader:
            values.setdefault(task_of[r.episode_id], []).append(r.value)
    return {task_id: sum(v) / len(v) for task_id, v in values.items()}


def episode_batch(store: TraceStore, summary: RunSummary, order: list[str], policy: Policy) -> Any:
    """The leader's calls and rewards of a rollout as a TrajectoryBatch, groups in question order."""
    from .batch import load_events, traces_to_batch

    position = {task_id: i for i, task_id in enumerate(order)}
    task_of = {r.episode_id: r.task_id for r in summary.results}
    calls, rewards = load_events(store, episode_ids=list(task_of), roles=("leader",))
    calls.sort(key=lambda c: (position[task_of[c.episode_id]], c.round, c.sample_index))
    return traces_to_batch(calls, rewards, **batch_options(policy))


# ------------------------------------------------------------------------------------------- offline


def offline_batch(config: MLPOConfig, spec: str, store: TraceStore) -> tuple[Any, int]:
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


# ------------------------------------------------------------------------------------------- the update


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


def update(policy: Policy, batch: TrajectoryBatch, max_tokens: int) -> dict[str, float]:
    """`update_epochs` GRPO steps on one batch (none when every group's rewards are equal: no signal).

    With `tempered_policy` the ratio's old policy is the tempered policy of the weights at the start of
    the update (see `trainers.update`): the detached current logprobs for one epoch, one no-grad forward
    before the first of several.
    """
    from .update import SKIPPED_UPDATE, OldLogprobs, nothing_to_learn, policy_update, with_current_logprobs

    c = policy.config
    if nothing_to_learn(batch, "grpo", c.kl_coef):  # before the old-logprob forward below
        return dict(SKIPPED_UPDATE)
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


def batch_metrics(batch: TrajectoryBatch) -> dict[str, float]:
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


def warm_up(policy: Policy, team: TeamConfig, config: MLPOConfig, store: TraceStore) -> dict[str, Any]:
    """SFT warm-up on correct leader completions, then serve it as `step-0`; returns its metrics."""
    metrics = sft_warmup(policy, collect_sft_examples(policy, team, config, store))
    policy.publish(0)
    return metrics


def sft_warmup(policy: Policy, examples: list[Any]) -> dict[str, float]:
    """TRL SFTTrainer on pre-tokenized leader completions (token-exact: loss on completion tokens only)."""
    from .trl_glue import fit, sft_rows

    c = policy.config
    if not examples:
        raise ValueError(
            "SFT warm-up found no correct leader completions; lower sft_steps to 0 or pass traces"
        )
    rows = sft_rows((e.prompt_token_ids, e.completion_token_ids) for e in examples)
    output = fit(
        "sft", policy.model, policy.tokenizer, rows, Path(c.out) / "sft",
        lr=c.sft_lr, seed=c.seed, batch_size=min(4, len(rows)), max_steps=c.sft_steps,
    )  # fmt: skip
    return {"sft/loss": float(output.training_loss), "sft/examples": len(rows)}


def correct_leader_calls(store: TraceStore, base_model: str, episode_ids: list[str] | None = None) -> list[Any]:
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


def collect_sft_examples(policy: Policy, team: TeamConfig, config: MLPOConfig, store: TraceStore) -> list[Any]:
    """Correct leader completions for the warm-up: from the store if it has some, else a fresh rollout."""
    from mlpo_agents.graphs import build_topology

    found = correct_leader_calls(store, policy.base_model)
    if found or config.offline:
        return found
    tasks = load_split(config, "train", config.sft_questions, seed=config.seed + 1)
    params = {**team.params, "leader_samples": config.group_size}
    summary = rollout(
        policy,
        leader_team(team, step_seed(config.seed, 0, "sft"), config.leader_temperature),
        tasks,
        store,
        build_topology(team.topology, **params),
        task_name=config.task,
    )
    return correct_leader_calls(store, policy.base_model, [r.episode_id for r in summary.results])
